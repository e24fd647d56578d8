"""Paper 004's Table I on the embedded "surfaces" data, plus a row with a primary task.

Rows (each run through ``python cli.py`` with ``configs/densehybrid/surfaces.yaml`` and a row config):

1-4. Table I: freeze all + mask, freeze backbone + mask, freeze none + rectangle, freeze all + rectangle;
     one model per category, tested on that category.
5.   The best of rows 1-4 (by mean pixel AUROC) with ``primary_task: category``: one model trained on
     all categories at once (``configs/densehybrid/surfaces_category.yaml``), tested on each category.
6.   (``--pooled-control``) the same pooled training without the primary task, to separate the effect of
     the primary task from that of training on all categories.

Columns: pixel AUROC, FPR95, AP and image AUROC, the mean over categories; training throughput
(images/s over training batches, warm-up excluded) and peak resident memory (RSS) while training. The
runs share one process (``cli.main``), so the peak is reset at the start of each fit (Linux
``/proc/self/clear_refs``); where that is not possible the process-wide peak is reported.

    python benchmarks/densehybrid_table.py --out docs/results/densehybrid_table            # full
    python benchmarks/densehybrid_table.py --out /tmp/densehybrid_quick --quick            # smoke run
    python benchmarks/densehybrid_table.py --out docs/results/densehybrid_throughput --throughput

``--throughput`` measures only training speed and peak RSS, each freeze policy in a fresh ``python cli.py``
process (the table's in-process peaks include what earlier runs left on the heap).

writes ``<out>.json`` and ``<out>.md``; run folders go under ``--run-root``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.comparison import paired_verdict  # noqa: E402
from cli import main as cli_main  # noqa: E402

CONFIGS = REPO / "configs" / "densehybrid"
CATEGORIES = ("brick", "grass", "gravel", "woven", "wood", "terrazzo")
TABLE1_ROWS = {
    "freeze-all_mask": ("all", "mask"),
    "freeze-backbone_mask": ("backbone", "mask"),
    "freeze-none_rectangle": ("none", "rectangle"),
    "freeze-all_rectangle": ("all", "rectangle"),
}
METRICS = {"pixel AUROC": "test/target/pixel_auroc", "pixel FPR95": "test/target/pixel_fpr95",
           "pixel AP": "test/target/pixel_ap", "image AUROC": "test/target/image_auroc",
           "pixel AUPRO": "test/target/pixel_aupro"}
WARMUP_BATCHES = 2
SCORE_ABLATION = ("outlier_head", "energy")
ABLATION_METRICS = ("pixel AUROC", "image AUROC")


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (VmHWM) on Linux; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainingThroughput(Callback):
    """Times training batches (paste + forward + backward + optimiser step) and records the peak RSS
    while training; writes ``throughput.json`` to the run folder when training ends."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self.batches = 0
        self._start = 0.0
        self.peak_was_reset = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.peak_was_reset = reset_peak_rss()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.batches > WARMUP_BATCHES:
            self.seconds += time.perf_counter() - self._start
            self.images += len(batch["image"])

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        record = {
            "images_per_second": self.images / self.seconds if self.seconds else None,
            "timed_images": self.images,
            "peak_rss_mib": peak_rss_mib(),
            "peak_rss_scope": "this fit" if self.peak_was_reset else "the process so far",
            "torch_threads": torch.get_num_threads(),
        }
        (Path(trainer.log_dir) / "throughput.json").write_text(json.dumps(record, indent=2))


def run_cli(args: list[str]) -> None:
    """``python cli.py <args>``, in this process."""
    cli_main(args)


def run_dir(run_root: Path, version: str) -> Path:
    found = list(run_root.glob(f"densehybrid/*/{version}"))
    if len(found) != 1:
        raise RuntimeError(f"expected one run folder {version!r} under {run_root}, found {found}")
    return found[0]


def common_args(args: argparse.Namespace, version: str) -> list[str]:
    return ["--config", "configs/trainer/default.yaml", "--config", str(CONFIGS / "surfaces.yaml"),
            "--data.init_args.image_size", str(args.image_size), "--run.root", str(args.run_root),
            "--run.version", version, "--run.wandb", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def fit_args(args: argparse.Namespace, version: str, freeze: str, paste: str) -> list[str]:
    return ["fit", *common_args(args, version), "--model.init_args.freeze", freeze,
            "--model.init_args.paste_shape", paste, "--trainer.max_epochs", str(args.epochs),
            "--trainer.callbacks+=benchmarks.densehybrid_table.TrainingThroughput"]


def reusable(args: argparse.Namespace, version: str, needs_results: bool = True) -> bool:
    """With ``--reuse``, a run that already finished (checkpoint or test results present) is not run again."""
    if not args.reuse:
        return False
    found = list(args.run_root.glob(f"densehybrid/*/{version}"))
    done = "results.json" if needs_results else "checkpoints/last.ckpt"
    return len(found) == 1 and (found[0] / done).is_file()


def read_run(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())["metrics"]
    record = {name: results[key] for name, key in METRICS.items() if key in results}
    throughput = folder / "throughput.json"
    if throughput.is_file():
        record.update(json.loads(throughput.read_text()))
    return record


def per_category_row(args: argparse.Namespace, key: str, freeze: str, paste: str) -> dict:
    runs = {}
    for category in args.categories:
        version = f"{key}-{category}"
        print(f"[{time.strftime('%H:%M:%S')}] {version}", flush=True)
        if not reusable(args, version):
            run_cli([*fit_args(args, version, freeze, paste), "--data.init_args.source.category", category,
                     "--run.test_after_fit", "true"])
        fitted = run_dir(args.run_root, version)
        runs[category] = read_run(fitted)
        for score in SCORE_ABLATION if args.score_ablation else ():
            tested = f"{version}-{score}"
            if not reusable(args, tested):
                run_cli(["test", *common_args(args, tested), "--model.init_args.freeze", freeze,
                         "--model.init_args.anomaly_score", score, "--data.init_args.source.category", category,
                         "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt")])
            alone = read_run(run_dir(args.run_root, tested))
            runs[category].update({f"{name} ({score})": alone[name] for name in ABLATION_METRICS})
    return {"freeze": freeze, "paste": paste, "training": "one model per category", "runs": runs}


def pooled_row(args: argparse.Namespace, key: str, freeze: str, paste: str, primary_task: str) -> dict:
    """One model trained on all categories, tested on each."""
    categories = f"[{','.join(args.categories)}]"
    task = ["--model.init_args.primary_task", primary_task, "--model.init_args.num_classes",
            str(len(args.categories) if primary_task == "category" else 21), "--data.init_args.source.category", categories]
    print(f"[{time.strftime('%H:%M:%S')}] {key} (pooled fit)", flush=True)
    if not reusable(args, key, needs_results=False):
        run_cli([*fit_args(args, key, freeze, paste), *task])
    fitted = run_dir(args.run_root, key)
    throughput = json.loads((fitted / "throughput.json").read_text())
    runs = {}
    for category in args.categories:
        version = f"{key}-test-{category}"
        if not reusable(args, version):
            run_cli(["test", *common_args(args, version), "--model.init_args.freeze", freeze,
                     "--model.init_args.paste_shape", paste, *task[:4], "--data.init_args.source.category", category,
                     "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt")])
        runs[category] = {**read_run(run_dir(args.run_root, version)), **throughput}
    return {"freeze": freeze, "paste": paste, "primary_task": primary_task,
            "training": "one model on all categories", "runs": runs}


def fresh_process_throughput(args: argparse.Namespace) -> None:
    """Training images/s and peak RSS of one ``python cli.py fit`` process per freeze policy."""
    rows = {}
    for freeze, paste in (("all", "mask"), ("backbone", "mask"), ("none", "rectangle")):
        version = f"throughput-{freeze}"
        for old in args.run_root.glob(f"densehybrid/*/{version}"):
            shutil.rmtree(old)
        command = [sys.executable, "cli.py", *fit_args(args, version, freeze, paste), "--trainer.max_epochs", "1",
                   "--trainer.limit_val_batches", "0", "--data.init_args.source.category", args.categories[0]]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        print(f"[{time.strftime('%H:%M:%S')}] {version}", flush=True)
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
        rows[freeze] = json.loads((run_dir(args.run_root, version) / "throughput.json").read_text())
    lines = [f"Training throughput and peak RSS, one fresh process per policy: {args.image_size} px, batch 16, "
             f"{args.threads} torch thread(s), category {args.categories[0]}, 1 epoch (first {WARMUP_BATCHES} "
             "batches not timed).", "", "| freeze | images/s | peak RSS MiB |", "|---|---|---|"]
    lines += [f"| {k} | {r['images_per_second']:.1f} | {r['peak_rss_mib']:.0f} |" for k, r in rows.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(row: dict) -> dict:
    runs = row["runs"].values()
    summary = {name: mean([r[name] for r in runs if name in r]) for name in METRICS}
    for score in SCORE_ABLATION:
        for name in ABLATION_METRICS:
            values = [r[f"{name} ({score})"] for r in runs if f"{name} ({score})" in r]
            if values:
                summary[f"{name} ({score})"] = mean(values)
    summary["images/s"] = mean([r["images_per_second"] for r in runs if r.get("images_per_second")])
    summary["peak RSS MiB"] = max((r["peak_rss_mib"] for r in runs if "peak_rss_mib" in r), default=None)
    return summary


def mask_vs_rectangle(rows: dict) -> str:
    """Paper 004's mask-vs-rectangle question at the freeze-all policy, paired over categories."""
    mask, rectangle = ({category: run["pixel AUROC"] for category, run in rows[key]["runs"].items()}
                       for key in ("freeze-all_mask", "freeze-all_rectangle"))
    return "pixel AUROC, " + paired_verdict(mask, rectangle, "mask", "rectangle") + ", one seed"


def markdown(table: dict, args: argparse.Namespace) -> str:
    columns = [*METRICS, "images/s", "peak RSS MiB"]
    lines = [f"DenseHybridAD on surfaces ({', '.join(args.categories)}), {args.image_size} px, {args.epochs} epoch(s), "
             f"light build (EfficientNet-Lite0), scikit-image negatives; metrics are means over categories.", "",
             "| row | freeze | paste | training | " + " | ".join(columns) + " |",
             "|---" * (4 + len(columns)) + "|"]
    for key, row in table["rows"].items():
        values = [row["summary"].get(name) for name in columns]
        cells = [("-" if v is None else f"{v:.1f}" if name in ("images/s", "peak RSS MiB") else f"{v:.4f}")
                 for name, v in zip(columns, values, strict=True)]
        lines.append(f"| {key} | {row['freeze']} | {row['paste']} | {row['training']} | " + " | ".join(cells) + " |")
    lines += ["", "Per category (pixel AUROC / image AUROC):", "",
              "| row | " + " | ".join(args.categories) + " |", "|---" * (1 + len(args.categories)) + "|"]
    for key, row in table["rows"].items():
        cells = [f"{row['runs'][c]['pixel AUROC']:.3f} / {row['runs'][c]['image AUROC']:.3f}" for c in args.categories]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    ablation = [k for k in next(iter(table["rows"].values()))["summary"] if "(" in k]
    if ablation:
        lines += ["", "Score terms alone (mean over categories):", "", "| row | " + " | ".join(ablation) + " |",
                  "|---" * (1 + len(ablation)) + "|"]
        lines += [f"| {key} | " + " | ".join(f"{row['summary'][k]:.4f}" for k in ablation) + " |"
                  for key, row in table["rows"].items() if ablation[0] in row["summary"]]
    lines += ["", f"Mask vs rectangle at freeze all: {table.get('mask_vs_rectangle', 'not measured yet')}"]
    return "\n".join(lines) + "\n"


def rebuild_table(args: argparse.Namespace) -> None:
    stored = args.out.with_suffix(".json")
    if not stored.is_file():
        raise SystemExit(f"--table-only: {stored} does not exist; run the table first")
    table = json.loads(stored.read_text())
    settings = table["settings"]
    args.categories, args.image_size, args.epochs = settings["categories"], settings["image_size"], settings["epochs"]
    if {"freeze-all_mask", "freeze-all_rectangle"} <= set(table["rows"]):
        table["mask_vs_rectangle"] = mask_vs_rectangle(table["rows"])
    stored.write_text(json.dumps(table, indent=2))
    args.out.with_suffix(".md").write_text(markdown(table, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Output path without extension (.json, .md).")
    parser.add_argument("--run-root", type=Path, default=Path("runs/densehybrid_table"))
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    parser.add_argument("--pooled-control", action="store_true", help="Add row 6 (pooled, no primary task).")
    parser.add_argument("--score-ablation", action="store_true",
                        help="Also test rows 1-4 with each score term alone (ln P(d_out|x); -ln p(x)).")
    parser.add_argument("--reuse", action="store_true",
                        help="Keep --run-root and skip the runs that already finished there (e.g. to add "
                             "--score-ablation or --pooled-control to a finished table).")
    parser.add_argument("--throughput", action="store_true",
                        help="Only measure training throughput and peak RSS (fresh process per freeze policy).")
    parser.add_argument("--quick", action="store_true", help="Two categories, 64 px, 1 epoch (a smoke run).")
    parser.add_argument("--table-only", action="store_true",
                        help="Rebuild <out>.md (and the derived verdicts) from <out>.json without running anything.")
    args = parser.parse_args()
    os.chdir(REPO)
    if args.table_only:
        rebuild_table(args)
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.categories, args.image_size, args.epochs = ["brick", "woven"], 64, 1
    if args.throughput:
        fresh_process_throughput(args)
        return
    if args.run_root.exists() and not args.reuse:
        shutil.rmtree(args.run_root)
    started = time.time()
    rows: dict[str, dict] = {}
    table = {"settings": {"categories": args.categories, "image_size": args.image_size, "epochs": args.epochs,
                          "threads": args.threads}, "rows": rows}

    def add_row(key: str, row: dict) -> None:
        """Adds a row and rewrites the outputs, so a cut-short run leaves the rows it finished."""
        row["summary"] = summarise(row)
        rows[key] = row
        table["settings"]["seconds"] = round(time.time() - started)
        if {"freeze-all_mask", "freeze-all_rectangle"} <= set(rows):
            table["mask_vs_rectangle"] = mask_vs_rectangle(rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(table, indent=2))
        args.out.with_suffix(".md").write_text(markdown(table, args))

    for key, setting in TABLE1_ROWS.items():
        add_row(key, per_category_row(args, key, *setting))
    best = table["best_table1_row"] = max(TABLE1_ROWS, key=lambda k: rows[k]["summary"]["pixel AUROC"])
    freeze, paste = TABLE1_ROWS[best]
    add_row(f"{best}+category", pooled_row(args, f"{best}_category", freeze, paste, "category"))
    if args.pooled_control:
        add_row(f"{best}+pooled", pooled_row(args, f"{best}_pooled", freeze, paste, "none"))
    print(markdown(table, args))


if __name__ == "__main__":
    main()
