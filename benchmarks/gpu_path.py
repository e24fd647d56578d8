"""The GPU path of every method: fp32, 16-mixed and bf16-mixed fits, and a one-GPU DDP fit.

Each run is a user's ``python cli.py fit ... --run.test_after_fit true`` with the method's embedded-data
config at its default size, shortened to ``--steps`` optimizer steps (PaDiM: its one pass over the
training images), plus ``callbacks.throughput.ThroughputMeter``. Runs go one at a time, so each owns the
GPU while it is timed. Per run it records the train and test throughput (images/s, data loading
included; the first 5 training batches and the first test batch are not timed), the peak GPU memory,
the wall time and the test metrics.

    python benchmarks/gpu_path.py --out docs/results/gpu_path          # writes gpu_path.json and gpu_path.md

Runs already in ``<out>.json`` are skipped, so a cut-off sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    name: str
    config: str
    args: tuple[str, ...] = ()
    ddp_strategy: str = "ddp"
    #: the test metrics shown in the table
    metrics: tuple[str, ...] = ("test/target/image_auroc", "test/target/pixel_auroc")
    needs: str | None = None  # the method whose checkpoint (same variant) this one starts from
    validates: bool = True  # False: the protocol has no validation data (few-shot: k target images only)


METHODS = (
    Method("dann", "dann/surfaces_dann.yaml", ("--data.init_args.source.category", "brick"),
           metrics=("test/target/accuracy", "test/target/auroc")),
    Method("csflow", "csflow/source_surfaces.yaml"),
    Method("csflow_adapt", "csflow/adapt_gray.yaml", needs="csflow", validates=False),
    Method("meta_comparer", "meta_comparer/surfaces.yaml", ("--data.init_args.held_out", "wood")),
    Method("padim", "padim/padim_surfaces.yaml", ddp_strategy="ddp_frozen"),
    Method("gmm_pretrain", "gmm_pretrain/gmm_surfaces.yaml", ("--trainer.max_epochs", "null"),
           metrics=("test/direct", "test/indirect")),
    Method("densehybrid", "densehybrid/surfaces.yaml"),
)
#: variant -> trainer arguments (strategy arguments are added per method)
VARIANTS = {
    "fp32": ("--trainer.precision", "32-true"),
    "16-mixed": ("--trainer.precision", "16-mixed"),
    "bf16-mixed": ("--trainer.precision", "bf16-mixed"),
    "ddp-1gpu": ("--trainer.precision", "32-true", "--trainer.devices", "1"),
}


def run(method: Method, variant: str, args: argparse.Namespace, checkpoints: dict) -> dict:
    run_root = args.run_root / variant
    command = [sys.executable, "cli.py", "fit", "--config", "configs/trainer/default.yaml",
               "--config", f"configs/{method.config}", *method.args, *VARIANTS[variant],
               "--trainer.accelerator", args.accelerator, "--trainer.max_steps", str(args.steps),
               *(["--trainer.limit_val_batches", "2"] if method.validates else []), "--trainer.enable_progress_bar", "false",
               "--data.init_args.num_workers", str(args.workers), "--run.root", str(run_root),
               "--run.wandb", "false", "--run.test_after_fit", "true",
               "--trainer.callbacks+=callbacks.throughput.ThroughputMeter"]
    if variant == "ddp-1gpu":
        command += ["--trainer.strategy", method.ddp_strategy]
        if method.ddp_strategy == "ddp":
            command += ["--trainer.sync_batchnorm", "true"]
    if method.needs:
        command += ["--model.init_args.source_checkpoint", str(checkpoints[(method.needs, variant)])]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    seconds = time.perf_counter() - started
    record = {"method": method.name, "variant": variant, "seconds": round(seconds, 1),
              "returncode": result.returncode, "command": " ".join(command[1:])}
    if result.returncode != 0:
        record["error"] = result.stderr[-3000:]
        return record
    run_dir = max((run_root / method.name).glob("*/version_*/results.json"), key=lambda p: p.stat().st_mtime).parent
    record["run_dir"] = str(run_dir)
    record["throughput"] = json.loads((run_dir / "throughput.json").read_text())
    record["metrics"] = json.loads((run_dir / "results.json").read_text())["metrics"]
    checkpoints[(method.name, variant)] = run_dir / "checkpoints" / "last.ckpt"
    return record


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(records: list[dict]) -> str:
    devices = sorted({r["throughput"]["train"]["device"] for r in records if "throughput" in r})
    lines = [f"Device: {', '.join(devices) or '-'}.", "",
             "| method | variant | train images/s | train peak MiB | test images/s | test peak MiB | test metrics | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    by_name = {m.name: m for m in METHODS}
    for record in records:
        if record["returncode"] != 0:
            lines.append(f"| {record['method']} | {record['variant']} | FAILED (exit {record['returncode']}) "
                         f"| | | | | {record['seconds']} |")
            continue
        train, test = record["throughput"].get("train", {}), record["throughput"].get("test", {})
        shown = ", ".join(f"{k.removeprefix('test/')} {record['metrics'][k]:.3f}"
                          for k in by_name[record["method"]].metrics if k in record["metrics"])
        lines.append(f"| {record['method']} | {record['variant']} | {fmt(train.get('images_per_s'))} | "
                     f"{fmt(train.get('peak_memory_mib'), 0)} | {fmt(test.get('images_per_s'))} | "
                     f"{fmt(test.get('peak_memory_mib'), 0)} | {shown} | {record['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_path", help="writes <out>.json and <out>.md")
    parser.add_argument("--run-root", type=Path, default=REPO / "runs" / "gpu_path_runs")
    parser.add_argument("--methods", nargs="+", default=[m.name for m in METHODS], choices=[m.name for m in METHODS])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per fit")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--accelerator", default="gpu", help="gpu; cpu only to try the script")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ledger = args.out.with_suffix(".json")
    records = json.loads(ledger.read_text())["records"] if ledger.is_file() else []
    done = {(r["method"], r["variant"]) for r in records if r["returncode"] == 0}
    checkpoints = {(r["method"], r["variant"]): Path(r["run_dir"]) / "checkpoints" / "last.ckpt"
                   for r in records if r["returncode"] == 0}
    for variant in args.variants:
        for method in (m for m in METHODS if m.name in args.methods):
            if (method.name, variant) in done:
                continue
            if method.needs and (method.needs, variant) not in checkpoints:
                continue
            record = run(method, variant, args, checkpoints)
            records = [r for r in records if (r["method"], r["variant"]) != (method.name, variant)] + [record]
            print(f"[gpu_path] {method.name} {variant}: exit {record['returncode']} ({record['seconds']} s)",
                  flush=True)
            ledger.write_text(json.dumps({"records": records}, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(table(records))
    print(table(records))


if __name__ == "__main__":
    main()
