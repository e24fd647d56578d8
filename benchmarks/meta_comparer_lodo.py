"""Leave-one-domain-out benchmark of the meta-comparer (paper 002, Table 1 and Figure 3 shapes).

For every held-out domain, through the same configs and ``cli.py`` as a user:
1. fit the meta-comparer (``configs/meta_comparer/surfaces.yaml``) and its ``aggregate`` ablation
   (``+ surfaces_aggregate.yaml``) on the other domains;
2. test both with the held-out domain's normals as references (no fine-tuning), the meta-comparer at
   every reference fraction, the ablation at 100 %;
3. test the AD baselines fitted on the same references, at every fraction: the k-NN patch detector
   (``surfaces_knn.yaml``) and PaDiM (``surfaces_padim.yaml``).

Writes ``lodo.json`` (every run's metrics, written after each run so a cut-off run keeps what it had),
``lodo.md`` (Table 1: image / pixel AUROC per held-out domain and the mean; Figure 3: mean image AUROC
against the reference fraction) and ``reference_fraction.png``.

    python benchmarks/meta_comparer_lodo.py --out runs/meta_comparer_lodo            # full protocol
    python benchmarks/meta_comparer_lodo.py --quick --out runs/meta_comparer_lodo_quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.runner import test_metrics  # noqa: E402
from cli import main as cli_main  # noqa: E402
from datamodules.surfaces import SURFACES_CATEGORIES  # noqa: E402

CONFIGS = REPO / "configs" / "meta_comparer"
TRAINER = str(REPO / "configs" / "trainer" / "default.yaml")
METHODS = {
    "meta_comparer": [str(CONFIGS / "surfaces.yaml")],
    "aggregate": [str(CONFIGS / "surfaces.yaml"), str(CONFIGS / "surfaces_aggregate.yaml")],
}
#: AD baselines fitted on the target references at test time (nothing trained)
BASELINES = {"knn": [str(CONFIGS / "surfaces_knn.yaml")], "padim": [str(CONFIGS / "surfaces_padim.yaml")]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="+", default=list(SURFACES_CATEGORIES), help="held-out domains to run")
    parser.add_argument("--all-domains", nargs="+", default=list(SURFACES_CATEGORIES),
                        help="every domain of the LODO split (sources = these minus the held-out one)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=1500, help="training steps per held-out domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 held-out domains, 40 steps, fractions 0.1 and 1.0")
    parser.add_argument("--skip", nargs="*", default=[], choices=["aggregate", *BASELINES], help="rows to leave out")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "meta_comparer_lodo")
    parser.add_argument("--merge", nargs="+", type=Path, default=[],
                        help="first take the runs recorded in these folders' lodo.json (held-out domains run "
                             "as separate processes, e.g. one each on a GPU machine)")
    parser.add_argument("--extra", action="append", default=[],
                        help="an extra CLI argument for every fit and test, e.g. "
                             "--extra=--model.init_args.reference_pooling=min (repeatable)")
    args = parser.parse_args()
    if args.quick:
        args.domains, args.max_steps, args.fractions = args.domains[:3], 40, [0.1, 1.0]
    return args


def common(args: argparse.Namespace, held_out: str, run_root: Path) -> list[str]:
    domains = "[" + ", ".join(args.all_domains) + "]"
    return ["--data.init_args.domains", domains, "--data.init_args.held_out", held_out,
            "--data.init_args.image_size", str(args.image_size), "--seed_everything", str(args.seed),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--run.root", str(run_root), "--run.wandb", "false", *args.extra]


def config_args(configs: list[str]) -> list[str]:
    return [arg for config in [TRAINER, *configs] for arg in ("--config", config)]


def record(results: dict, path: Path, key: str, logged: dict, seconds: float) -> None:
    metrics = test_metrics(logged)
    results[key] = {"metrics": metrics, "seconds": round(seconds, 1)}
    path.write_text(json.dumps(results, indent=2))
    print(f"[lodo] {key}: image AUROC {metrics.get('target/image_auroc', float('nan')):.4f}  "
          f"pixel AUROC {metrics.get('target/pixel_auroc', float('nan')):.4f}  ({seconds:.0f} s)", flush=True)


def run_domain(args: argparse.Namespace, held_out: str, results: dict, json_path: Path) -> None:
    run_root = args.out / "runs"
    for method, configs in METHODS.items():
        if method in args.skip:
            continue
        fractions = args.fractions if method == "meta_comparer" else [1.0]
        if all(f"{method}/{held_out}/{f}" in results for f in fractions):
            continue
        start = time.perf_counter()
        cli = cli_main(["fit", *config_args(configs), *common(args, held_out, run_root),
                        "--trainer.max_steps", str(args.max_steps)])
        checkpoint = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
        results[f"{method}/{held_out}/train_seconds"] = round(time.perf_counter() - start, 1)
        for fraction in fractions:
            start = time.perf_counter()
            cli = cli_main(["test", *config_args(configs), *common(args, held_out, run_root),
                            "--data.init_args.reference_fraction", str(fraction), "--ckpt_path", str(checkpoint)])
            record(results, json_path, f"{method}/{held_out}/{fraction}", cli.model.test_results,
                   time.perf_counter() - start)
    for baseline, configs in BASELINES.items():
        for fraction in [] if baseline in args.skip else args.fractions:
            if f"{baseline}/{held_out}/{fraction}" in results:
                continue
            start = time.perf_counter()
            cli = cli_main(["test", *config_args(configs), *common(args, held_out, run_root),
                            "--data.init_args.reference_fraction", str(fraction)])
            record(results, json_path, f"{baseline}/{held_out}/{fraction}", cli.model.test_results,
                   time.perf_counter() - start)


def metric(results: dict, method: str, domain: str, fraction: float, name: str) -> float | None:
    """Metric ``name`` (``image_auroc``, ...) of a run on its held-out domain, the test's target."""
    entry = results.get(f"{method}/{domain}/{fraction}")
    return None if entry is None else entry["metrics"].get(f"target/{name}")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def tables(args: argparse.Namespace, results: dict) -> str:
    rows = [("meta_comparer", "meta-comparer (L_cls + L_att + L_rank)"), ("aggregate", "aggregate (L_cls only)"),
            ("knn", "k-NN patch baseline (fitted on the references)"),
            ("padim", "PaDiM baseline (fitted on the references)")]
    domains = args.domains
    lines = ["### Table 1 shape: LODO on surfaces, 100 % references", "",
             "Image AUROC / pixel AUROC per held-out domain.", "",
             "| method | " + " | ".join(domains) + " | mean |", "|---" * (len(domains) + 2) + "|"]
    for key, label in rows:
        cells, image_all, pixel_all = [], [], []
        for domain in domains:
            image, pixel = (metric(results, key, domain, 1.0, n) for n in ("image_auroc", "pixel_auroc"))
            image_all.append(image)
            pixel_all.append(pixel)
            cells.append(f"{fmt(image)} / {fmt(pixel)}")
        cells.append(f"{fmt(mean(image_all))} / {fmt(mean(pixel_all))}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "### Figure 3 shape: mean image AUROC (and mean pixel AUROC) vs reference fraction", "",
              "| references | meta-comparer image | k-NN image | PaDiM image | meta-comparer pixel | k-NN pixel "
              "| PaDiM pixel |", "|---|---|---|---|---|---|---|"]
    for fraction in args.fractions:
        values = [mean([metric(results, key, d, fraction, name) for d in domains])
                  for name in ("image_auroc", "pixel_auroc") for key in ("meta_comparer", "knn", "padim")]
        lines.append(f"| {round(fraction * 100)} % | " + " | ".join(fmt(v) for v in values) + " |")
    lines += ["", "Per domain, image AUROC (meta-comparer / k-NN / PaDiM):", "",
              "| references | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for fraction in args.fractions:
        cells = [" / ".join(fmt(metric(results, key, d, fraction, "image_auroc"))
                            for key in ("meta_comparer", "knn", "padim")) for d in domains]
        lines.append(f"| {round(fraction * 100)} % | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for key, label in (("meta_comparer", "meta-comparer"), ("knn", "k-NN patch (AD baseline)"),
                       ("padim", "PaDiM (AD baseline)")):
        points = [(f * 100, mean([metric(results, key, d, f, "image_auroc") for d in args.domains]))
                  for f in args.fractions]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel("target normal references (%)")
    ax.set_ylabel("mean image AUROC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "lodo.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    for folder in args.merge:
        if not (folder / "lodo.json").is_file():
            raise SystemExit(f"--merge {folder}: no lodo.json there (the --out folder of an earlier run is expected)")
        merged = json.loads((folder / "lodo.json").read_text())
        results.update({key: value for key, value in merged.items() if key != "settings" and key not in results})
    results["settings"] = {"domains": args.domains, "all_domains": args.all_domains, "fractions": args.fractions,
                           "image_size": args.image_size, "max_steps": args.max_steps, "seed": args.seed,
                           "extra": args.extra, "command": " ".join(sys.argv)}
    for held_out in args.domains:
        run_domain(args, held_out, results, json_path)
    json_path.write_text(json.dumps(results, indent=2))
    markdown = tables(args, results)
    (args.out / "lodo.md").write_text(markdown)
    plot(args, results, args.out / "reference_fraction.png")
    print(markdown)


if __name__ == "__main__":
    main()
