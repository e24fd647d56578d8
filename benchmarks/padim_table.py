"""Paper 003's Table 1 on "surfaces": PaDiM with the ImageNet backbone vs the GMM-direct and GMM-indirect ones.

Every cell is one ``python cli.py fit ... --run.test_after_fit true`` of ``configs/padim/padim_surfaces.yaml``
(run in-process through ``cli.main``). The GMM backbones are ``backbone.pth`` files of pre-training runs of
``configs/gmm_pretrain/gmm_surfaces.yaml``; without ``--direct``/``--indirect`` they are pre-trained first
through the same CLI.

    python benchmarks/padim_table.py --out docs/results/padim_table \
        --direct runs/gmm_pretrain/<tag>/direct/backbone.pth --indirect runs/gmm_pretrain/<tag>/indirect/backbone.pth

writes ``<out>.json`` and ``<out>.md``. ``--quick`` runs two categories at 64 px (and a 64-sample
pre-training when it has to pre-train).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli import main  # noqa: E402
from datamodules.surfaces import SURFACES_CATEGORIES  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--run.wandb", "false"]


def pretrain(loss: str, runs: Path, quick: bool) -> Path:
    """Runs configs/gmm_pretrain/gmm_surfaces.yaml with ``loss`` and returns its backbone.pth."""
    sizes = ["--data.init_args.train_samples", "64", "--data.init_args.image_size", "64"] if quick else []
    cli = main(["fit", "--config", "configs/trainer/default.yaml", "--config", "configs/gmm_pretrain/gmm_surfaces.yaml",
                *QUIET, "--run.root", str(runs), "--run.version", loss, "--model.init_args.loss", loss, *sizes])
    return Path(cli.trainer.default_root_dir) / "backbone.pth"


def padim_cell(category: str, weights: str | None, seed: int, image_size: int, runs: Path) -> dict[str, float]:
    args = ["fit", "--config", "configs/trainer/default.yaml", "--config", "configs/padim/padim_surfaces.yaml", *QUIET,
            "--run.root", str(runs), "--run.test_after_fit", "true", "--data.init_args.source.category", category,
            "--data.init_args.image_size", str(image_size), "--data.init_args.resize_size", "null",
            "--model.init_args.feature_seed", str(seed)]
    if weights:
        args += ["--model.init_args.backbone.weights", weights]
    cli = main(args)
    run_dir = Path(cli.trainer.default_root_dir)
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the float64 sums; not needed for the table
    return {name: metrics[f"test/target/{name}"] for name in METRICS}


def markdown(rows: dict, backbones: list[str], categories: list[str]) -> str:
    lines = []
    for name in METRICS:
        lines += [f"**{name.replace('_', ' ')}**", "", "| category | " + " | ".join(backbones) + " |",
                  "|---|" + "---|" * len(backbones)]
        for category in [*categories, "mean"]:
            cells = [rows[b][category][name] for b in backbones]
            best = max(cells)
            text = [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in cells]
            lines.append(f"| {category} | " + " | ".join(text) + " |")
        lines.append("")
    return "\n".join(lines)


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output prefix (.json and .md are written)")
    parser.add_argument("--runs", type=Path, default=Path("runs/padim_table"), help="run root for the CLI runs")
    parser.add_argument("--direct", help="backbone.pth of an L_direct pre-training (pre-trained here if absent)")
    parser.add_argument("--indirect", help="backbone.pth of an L_indirect pre-training (pre-trained here if absent)")
    parser.add_argument("--categories", nargs="+", default=list(SURFACES_CATEGORIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="channel-subset seeds, averaged")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="2 categories at 64 px")
    args = parser.parse_args()
    if args.quick:
        args.categories, args.image_size = args.categories[:2], 64
    start = time.perf_counter()
    weights = {"ImageNet": None,
               "GMM direct": args.direct or str(pretrain("direct", args.runs / "pretrain", args.quick)),
               "GMM indirect": args.indirect or str(pretrain("indirect", args.runs / "pretrain", args.quick))}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for backbone, path in weights.items():
        rows[backbone] = {}
        for category in args.categories:
            cells = [padim_cell(category, path, seed, args.image_size, args.runs) for seed in args.seeds]
            rows[backbone][category] = {m: sum(c[m] for c in cells) / len(cells) for m in METRICS}
            print(backbone, category, rows[backbone][category], flush=True)
        rows[backbone]["mean"] = {m: sum(rows[backbone][c][m] for c in args.categories) / len(args.categories)
                                  for m in METRICS}
        # Written after every backbone, so a long run keeps what it has measured.
        report = {"command": " ".join(sys.argv), "image_size": args.image_size, "seeds": args.seeds,
                  "backbone_weights": weights, "results": rows, "seconds": round(time.perf_counter() - start, 1)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        table = markdown(rows, list(rows), args.categories)
        args.out.with_suffix(".md").write_text(f"`{report['command']}`\n\n{table}")
    print(table)

if __name__ == "__main__":
    main_cli()
