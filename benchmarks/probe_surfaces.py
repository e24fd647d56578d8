"""Measure how hard the embedded "surfaces" dataset is, in-domain and under each domain shift.

The probe is a fixed k-nearest-neighbour detector (k=1) on locally pooled patch features of the
default pretrained backbone (packaged ImageNet EfficientNet-Lite0, ``blocks.4`` and ``blocks.6``, each
3x3 average-pooled, brought to the ``blocks.4`` grid and concatenated). Its memory bank holds the patch
features of all train normals of a category under no shift; an image's score is the largest distance
of its patches to their nearest bank patch. It is evaluated on the test split as it is (in-domain) and
under each shift.

Targets the dataset is tuned for (the probe stays fixed): mean in-domain image AUROC in
[0.80, 0.97], and a mean drop of at least 0.10 under the shifts.

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
from datamodules.surfaces import SURFACES_CATEGORIES, default_surfaces_root, ensure_surfaces  # noqa: E402
from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor  # noqa: E402

LAYERS = ["blocks.4", "blocks.6"]
PROBE_SHIFTS = ("gray", "brg", "coljit", "fda", "histmatch")
IN_DOMAIN_RANGE = (0.80, 0.97)
MIN_MEAN_DROP = 0.10


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


def probe(root: Path, categories: list[str], shifts: list[str], image_size: int, batch_size: int) -> dict:
    extractor = FeatureExtractor(BackboneSpec(), layers=LAYERS).eval()
    results: dict[str, dict[str, float]] = {}
    for category in categories:
        samples = read_category("surfaces", root, category)
        train = AnomalyDataset(samples.train, [category], Shift(None), image_size)
        bank = patch_features(extractor, train, batch_size)
        bank = bank.reshape(-1, bank.shape[-1])
        labels = [s.label for s in samples.test]
        results[category] = {}
        for shift in ["none", *shifts]:
            test = AnomalyDataset(samples.test, [category], Shift(shift), image_size)
            scores = knn_scores(bank, patch_features(extractor, test, batch_size))
            results[category][shift] = float(roc_auc_score(labels, scores.numpy()))
        print(f"{category:10s} " + " ".join(f"{s}={v:.3f}" for s, v in results[category].items()), flush=True)
    return results


def summarise(results: dict[str, dict[str, float]], shifts: list[str]) -> dict:
    categories = list(results)
    in_domain = sum(results[c]["none"] for c in categories) / len(categories)
    per_shift = {s: sum(results[c][s] for c in categories) / len(categories) for s in shifts}
    drops = {s: in_domain - v for s, v in per_shift.items()}
    mean_drop = sum(drops.values()) / len(drops)
    return {
        "in_domain_mean": in_domain,
        "shift_mean": per_shift,
        "shift_drop": drops,
        "mean_drop": mean_drop,
        "in_domain_ok": IN_DOMAIN_RANGE[0] <= in_domain <= IN_DOMAIN_RANGE[1],
        "drop_ok": mean_drop >= MIN_MEAN_DROP,
    }


def markdown(results: dict[str, dict[str, float]], summary: dict, shifts: list[str], header: str) -> str:
    columns = ["none", *shifts]
    lines = [header, "", "| category | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for category, row in results.items():
        lines.append(f"| {category} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    means = [summary["in_domain_mean"], *(summary["shift_mean"][s] for s in shifts)]
    lines.append("| **mean** | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    lines.append("| **drop** | – | " + " | ".join(f"{summary['shift_drop'][s]:+.3f}" for s in shifts) + " |")
    lines += [
        "",
        f"- mean in-domain AUROC {summary['in_domain_mean']:.3f} (target {IN_DOMAIN_RANGE[0]:.2f}-"
        f"{IN_DOMAIN_RANGE[1]:.2f}): {'ok' if summary['in_domain_ok'] else 'MISSED'}",
        f"- mean drop under shift {summary['mean_drop']:.3f} (target >= {MIN_MEAN_DROP:.2f}): "
        f"{'ok' if summary['drop_ok'] else 'MISSED'}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output path stem: writes <out>.json and <out>.md")
    parser.add_argument("--root", default=None, help="surfaces folder (default: the default build in the cache)")
    parser.add_argument("--categories", nargs="+", default=list(SURFACES_CATEGORIES))
    parser.add_argument("--shifts", nargs="+", default=list(PROBE_SHIFTS))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=25)
    args = parser.parse_args(argv)

    root = ensure_surfaces(Path(args.root) if args.root else default_surfaces_root())
    start = time.perf_counter()
    results = probe(root, args.categories, args.shifts, args.image_size, args.batch_size)
    summary = summarise(results, args.shifts)
    header = (f"# surfaces probe: kNN (k=1) on pooled EfficientNet-Lite0 {'+'.join(LAYERS)} patch features, "
              f"image AUROC, {args.image_size} px, {root}")
    report = markdown(results, summary, args.shifts, header)
    print(report)
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".md") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"root": str(root), "image_size": args.image_size, "layers": LAYERS, "per_category": results,
               **summary, "seconds": round(time.perf_counter() - start, 1)}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(report)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({payload['seconds']} s)")
    return 0 if summary["in_domain_ok"] and summary["drop_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
