"""Measure how hard the embedded "surfaces" dataset is: in-domain, under each synthetic domain shift, and
across the embedded real pair (``surfaces`` line a -> ``surfaces_line_b``).

The probe is a fixed k-nearest-neighbour detector (k=1) on locally pooled patch features of the
default pretrained backbone (packaged ImageNet EfficientNet-Lite0, ``blocks.4`` and ``blocks.6``, each
3x3 average-pooled, brought to the ``blocks.4`` grid and concatenated). Its memory bank holds the patch
features of all train normals of a category under no shift; an image's score is the largest distance
of its patches to their nearest bank patch. It is evaluated on the test split as it is (in-domain) and
under each shift. For the real pair it is also fitted on the target's train normals: the pair's cost per
category is (target -> target) minus (source -> target) image AUROC.

Targets the datasets are tuned for (the probe stays fixed): mean in-domain image AUROC in [0.80, 0.97] on
each line, a mean drop of at least 0.10 under the shifts, and a mean cost of the real pair of at least 0.10.

    python benchmarks/probe_surfaces.py --out docs/surfaces_probe

writes ``<out>.json`` and ``<out>.md`` and exits with status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from datamodules.dataset import AnomalyDataset  # noqa: E402
from datamodules.readers import read_category  # noqa: E402
from datamodules.shifts import Shift  # noqa: E402
from datamodules.surfaces import (  # noqa: E402
    EMBEDDED_DATASETS,
    SURFACES_CATEGORIES,
    default_embedded_root,
    ensure_embedded,
)
from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor  # noqa: E402

LAYERS = ["blocks.4", "blocks.6"]
PROBE_SHIFTS = ("gray", "brg", "coljit", "fda", "histmatch")
IN_DOMAIN_RANGE = (0.80, 0.97)
MIN_MEAN_DROP = 0.10
MIN_PAIR_COST = 0.10


@torch.no_grad()
def patch_features(extractor: FeatureExtractor, dataset: AnomalyDataset, batch_size: int) -> torch.Tensor:
    """[N images, patches, channels] locally pooled patch features."""
    per_batch = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        maps = extractor(batch["image"])
        grid = maps[LAYERS[0]].shape[-2:]
        pooled = [F.avg_pool2d(F.interpolate(maps[name], size=grid, mode="bilinear", align_corners=False), 3, 1, 1)
                  for name in LAYERS]
        per_batch.append(torch.cat(pooled, 1).flatten(2).transpose(1, 2))
    return torch.cat(per_batch)


def knn_scores(bank: torch.Tensor, queries: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Image scores: max over an image's patches of the distance to the nearest bank patch."""
    flat = queries.reshape(-1, queries.shape[-1])
    nearest = torch.cat([torch.cdist(part, bank).amin(1) for part in flat.split(chunk)])
    return nearest.view(queries.shape[0], -1).amax(1)


def probe(root: Path, categories: list[str], shifts: list[str], image_size: int, batch_size: int,
          target: tuple[str, Path] | None = None) -> dict:
    """Per category: AUROC on the source test split under no shift and each shift (bank: source train
    normals) and, with ``target`` = (dataset, root), "source->target" and "target->target"."""
    extractor = FeatureExtractor(BackboneSpec(), layers=LAYERS).eval()

    def bank_of(samples: list, category: str) -> torch.Tensor:
        bank = patch_features(extractor, AnomalyDataset(samples, [category], Shift(None), image_size), batch_size)
        return bank.reshape(-1, bank.shape[-1])

    def auroc(bank: torch.Tensor, test: list, category: str, shift: str | None) -> float:
        dataset = AnomalyDataset(test, [category], Shift(shift), image_size)
        scores = knn_scores(bank, patch_features(extractor, dataset, batch_size))
        return float(roc_auc_score([s.label for s in test], scores.numpy()))

    results: dict[str, dict[str, float]] = {}
    for category in categories:
        samples = read_category("surfaces", root, category)
        bank = bank_of(samples.train, category)
        results[category] = {shift: auroc(bank, samples.test, category, shift) for shift in ["none", *shifts]}
        if target is not None:
            target_samples = read_category(*target, category)
            results[category]["source->target"] = auroc(bank, target_samples.test, category, None)
            target_bank = bank_of(target_samples.train, category)
            results[category]["target->target"] = auroc(target_bank, target_samples.test, category, None)
        print(f"{category:10s} " + " ".join(f"{s}={v:.3f}" for s, v in results[category].items()), flush=True)
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(results: dict[str, dict[str, float]], shifts: list[str], target: str | None) -> dict:
    categories = list(results)
    in_domain = _mean([results[c]["none"] for c in categories])
    summary: dict = {"in_domain_mean": in_domain,
                     "in_domain_ok": IN_DOMAIN_RANGE[0] <= in_domain <= IN_DOMAIN_RANGE[1]}
    if shifts:
        per_shift = {s: _mean([results[c][s] for c in categories]) for s in shifts}
        drops = {s: in_domain - v for s, v in per_shift.items()}
        mean_drop = _mean(list(drops.values()))
        summary.update(shift_mean=per_shift, shift_drop=drops, mean_drop=mean_drop, drop_ok=mean_drop >= MIN_MEAN_DROP)
    if target is not None:
        costs = {c: results[c]["target->target"] - results[c]["source->target"] for c in categories}
        target_in_domain = _mean([results[c]["target->target"] for c in categories])
        mean_cost = _mean(list(costs.values()))
        summary["real_pair"] = {
            "target": target,
            "source_target_mean": _mean([results[c]["source->target"] for c in categories]),
            "target_in_domain_mean": target_in_domain,
            "cost": costs,
            "mean_cost": mean_cost,
            "target_in_domain_ok": IN_DOMAIN_RANGE[0] <= target_in_domain <= IN_DOMAIN_RANGE[1],
            "cost_ok": mean_cost >= MIN_PAIR_COST,
        }
    return summary


def all_ok(summary: dict) -> bool:
    pair = summary.get("real_pair", {})
    return all([summary["in_domain_ok"], summary.get("drop_ok", True), pair.get("target_in_domain_ok", True),
                pair.get("cost_ok", True)])


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def markdown(results: dict[str, dict[str, float]], summary: dict, shifts: list[str], header: str) -> str:
    low, high = IN_DOMAIN_RANGE
    columns = ["none", *shifts]
    lines = [header, "", "Synthetic shifts (bank: surfaces train normals, test: surfaces test split under the shift):",
             "", "| category | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for category, row in results.items():
        lines.append(f"| {category} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    means = [summary["in_domain_mean"], *(summary["shift_mean"][s] for s in shifts)]
    lines.append("| **mean** | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    if shifts:
        lines.append("| **drop** | – | " + " | ".join(f"{summary['shift_drop'][s]:+.3f}" for s in shifts) + " |")
    lines += ["", f"- mean in-domain AUROC {summary['in_domain_mean']:.3f} (target {low:.2f}-{high:.2f}): "
              f"{_verdict(summary['in_domain_ok'])}"]
    if shifts:
        lines.append(f"- mean drop under shift {summary['mean_drop']:.3f} (target >= {MIN_MEAN_DROP:.2f}): "
                     f"{_verdict(summary['drop_ok'])}")
    pair = summary.get("real_pair")
    if pair:
        target = pair["target"]
        lines += ["", f"Real pair surfaces -> {target} (source -> target: bank from surfaces train normals, "
                  f"target -> target: bank from {target} train normals; both tested on the {target} test split):",
                  "", f"| category | surfaces -> surfaces | surfaces -> {target} | {target} -> {target} | cost |",
                  "|---|---|---|---|---|"]
        for category, row in results.items():
            lines.append(f"| {category} | {row['none']:.3f} | {row['source->target']:.3f} | "
                         f"{row['target->target']:.3f} | {pair['cost'][category]:+.3f} |")
        lines += [f"| **mean** | {summary['in_domain_mean']:.3f} | {pair['source_target_mean']:.3f} | "
                  f"{pair['target_in_domain_mean']:.3f} | {pair['mean_cost']:+.3f} |", "",
                  f"- {target} in-domain AUROC {pair['target_in_domain_mean']:.3f} (target {low:.2f}-{high:.2f}): "
                  f"{_verdict(pair['target_in_domain_ok'])}",
                  f"- mean cost of the pair {pair['mean_cost']:.3f} (target >= {MIN_PAIR_COST:.2f}): "
                  f"{_verdict(pair['cost_ok'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output path stem: writes <out>.json and <out>.md")
    parser.add_argument("--root", default=None, help="surfaces folder (default: the default build in the cache)")
    parser.add_argument("--categories", nargs="+", default=list(SURFACES_CATEGORIES))
    parser.add_argument("--shifts", nargs="*", default=list(PROBE_SHIFTS), help="synthetic shifts; none: skip them")
    parser.add_argument("--target", default="surfaces_line_b", choices=[*EMBEDDED_DATASETS[1:], "none"],
                        help="embedded dataset of the real pair's target; none: skip the pair")
    parser.add_argument("--target-root", default=None, help="folder of --target (default: its default build)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=25)
    args = parser.parse_args(argv)

    root = Path(args.root) if args.root else default_embedded_root("surfaces")
    ensure_embedded("surfaces", root)
    target = None if args.target == "none" else args.target
    target_root = None
    if target is not None:
        target_root = Path(args.target_root) if args.target_root else default_embedded_root(target)
        ensure_embedded(target, target_root)
    start = time.perf_counter()
    results = probe(root, args.categories, args.shifts, args.image_size, args.batch_size,
                    None if target is None else (target, target_root))
    summary = summarise(results, args.shifts, target)
    header = (f"# surfaces probe: kNN (k=1) on pooled EfficientNet-Lite0 {'+'.join(LAYERS)} patch features, "
              f"image AUROC, {args.image_size} px, {root}" + (f" and {target_root}" if target else ""))
    report = markdown(results, summary, args.shifts, header)
    print(report)
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".md") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"root": str(root), "target_root": None if target_root is None else str(target_root),
               "image_size": args.image_size, "layers": LAYERS, "per_category": results, **summary,
               "seconds": round(time.perf_counter() - start, 1)}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(report)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({payload['seconds']} s)")
    return 0 if all_ok(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
