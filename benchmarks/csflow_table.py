"""Paper 001's Figure 4/5 on the embedded "surfaces" data: CS-Flow under 5 domain shifts, few-shot baselines
and few-shot adaptation of the extractor with the flow frozen; plus the phase-1 feature-cache timing.

Protocols (columns), each scored by image AUROC on the target test split (mean over folds):

- ``source_only``: phase 1 on source normals (no shift), tested under every shift (one fit in all);
- ``k_only``: phase 1 on the k target shots only (``baseline_target_shots.yaml``);
- ``source_plus_k``: phase 1 on source normals + the k target shots (``baseline_source_plus_shots.yaml``);
- ``adapted``: phase 2 from the ``source_only`` checkpoint on the k target shots (``adapt_gray.yaml``);
- ``full_target``: phase 1 on all target normals (``baseline_target_full.yaml``; upper bound, no folds).

Every job is one ``python cli.py fit|test ...`` process with the same configs a user runs (the timing runs
in this process, to time the training loop alone). Results are merged into the ledger ``<out>.json`` after
every job and a job already there is skipped, so an interrupted sweep continues.

    python benchmarks/csflow_table.py --out docs/results/csflow_table                      # full: 5 folds
    python benchmarks/csflow_table.py --folds 0 1 --out docs/results/csflow_table          # reduced
    python benchmarks/csflow_table.py --quick --out runs/csflow_quick                      # smoke: 64 px, 1 fold
    python benchmarks/csflow_table.py --timing --out docs/results/csflow_timing            # cache on/off timing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.runner import Ledger, markdown_table, run_cli, test_metrics  # noqa: E402
from cli import ShiftADCLI  # noqa: E402

SHIFTS = ("gray", "brg", "coljit", "fda", "histmatch")
PROTOCOLS = ("source_only", "k_only", "source_plus_k", "adapted", "full_target")
BASELINE_CONFIGS = {"k_only": "baseline_target_shots.yaml", "source_plus_k": "baseline_source_plus_shots.yaml",
                    "full_target": "baseline_target_full.yaml"}
CONFIGS = REPO / "configs" / "csflow"
METRIC = "target/image_auroc"


class FitTimer(Callback):
    """Wall time of every training epoch and of the whole training loop (no validation or set-up)."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.total = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(time.perf_counter() - self.epoch_started)

    def on_train_end(self, trainer, pl_module) -> None:
        self.total = time.perf_counter() - self.started


def common_args(args: argparse.Namespace, run_root: Path) -> list[str]:
    return ["--data.init_args.source.category", args.category, "--data.init_args.image_size", str(args.image_size),
            "--run.root", str(run_root), "--run.wandb", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *args.extra]


def source_config(args: argparse.Namespace) -> list[str]:
    # One checkpoint at the end and no validation: the benchmark tests the final weights, and with k shots an
    # epoch is one step, so per-epoch checkpoints and validation would cost more than the training.
    return ["-c", str(REPO / "configs/trainer/default.yaml"), "-c", str(CONFIGS / "source_surfaces.yaml"),
            "--model.init_args.image_size", str(args.image_size), "--trainer.max_steps", str(args.source_steps),
            "--checkpoint.every_n_train_steps", str(args.source_steps), "--trainer.limit_val_batches", "0"]


class TimedCLI(ShiftADCLI):
    """The ShiftAD CLI with extra callbacks on its Trainer (the timer)."""

    def __init__(self, callbacks: list[Callback], **kwargs) -> None:
        self.extra_callbacks = callbacks
        super().__init__(**kwargs)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend(self.extra_callbacks)
        return trainer


def run_fit(command: list[str], timer: FitTimer | None = None, test: bool = True) -> tuple[dict, float]:
    """One ``cli.py fit ... --run.test_after_fit true`` in this process; returns (test metrics, seconds)."""
    started = time.perf_counter()
    cli = TimedCLI([timer] if timer else [], args=["fit", *command, "--run.test_after_fit", str(test).lower()])
    return test_metrics(cli.model.test_results), time.perf_counter() - started


def run_job(subcommand: str, command: list[str], run_root: Path) -> dict:
    """One ``python cli.py <subcommand> ...`` (a fit tests after fitting); returns its record."""
    run = run_cli(subcommand, [*command, *(["--run.test_after_fit", "true"] if subcommand == "fit" else [])],
                  run_root)
    return {**run.metrics, **run.cost()}


def last_checkpoint(run_root: Path, method: str) -> Path:
    return max(run_root.glob(f"{method}/*/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)


def sweep(args: argparse.Namespace) -> None:
    ledger = Ledger(Path(f"{args.out}.json"), lambda record: record["key"])
    records = {record["key"]: record for record in ledger.merge()}
    run_root = Path(args.run_root)

    def record(key: str, job) -> None:
        if key in records:
            return
        current = ledger.claim(key)
        if current is None:
            print(f"=== {key}: finished or running in another sweep on {ledger.path}, skipped", flush=True)
            return
        records.update((r["key"], r) for r in current)
        print(f"=== {key}", flush=True)
        try:
            result = job()
        except BaseException:
            ledger.release(key)
            raise
        records.update((r["key"], r) for r in ledger.merge([{"key": key, **result}]))
        write_table(records, args)

    source_root = run_root / "source_only"

    def source_only(shift: str):
        if not list(source_root.glob("csflow/*/version_*/checkpoints/last.ckpt")):
            run_job("fit", [*source_config(args), *common_args(args, source_root)], source_root)
        return run_job("test", [*source_config(args), *common_args(args, source_root), "--data.init_args.target.shift",
                                shift, "--ckpt_path", str(last_checkpoint(source_root, "csflow"))], source_root)

    for shift in args.shifts:
        if "source_only" in args.protocols:
            record(f"source_only/{shift}", lambda shift=shift: source_only(shift))
        if "full_target" in args.protocols:
            record(f"full_target/{shift}", lambda shift=shift: run_job("fit", [
                *source_config(args), "-c", str(CONFIGS / BASELINE_CONFIGS["full_target"]),
                "--data.init_args.target.shift", shift, *common_args(args, run_root / "full_target")],
                run_root / "full_target"))
    for fold in args.folds:
        for k in args.shots:
            for shift in args.shifts:
                shots = ["--data.init_args.target.shift", shift, "--data.init_args.target_shots", str(k),
                         "--data.init_args.fold", str(fold)]
                if "adapted" in args.protocols:
                    record(f"adapted/{shift}/k{k}/f{fold}",
                           lambda shots=shots: run_job("fit", adapt_command(args, run_root, shots), run_root / "adapted"))
                for protocol in ("k_only", "source_plus_k"):
                    if protocol in args.protocols:
                        record(f"{protocol}/{shift}/k{k}/f{fold}", lambda protocol=protocol, shots=shots: run_job("fit", [
                            *source_config(args), "-c", str(CONFIGS / BASELINE_CONFIGS[protocol]), *shots,
                            *common_args(args, run_root / protocol)], run_root / protocol))


def adapt_command(args: argparse.Namespace, run_root: Path, shots: list[str]) -> list[str]:
    source = last_checkpoint(run_root / "source_only", "csflow")
    return ["-c", str(REPO / "configs/trainer/default.yaml"), "-c", str(CONFIGS / "adapt_gray.yaml"),
            "--model.init_args.source_checkpoint", str(source), "--trainer.max_steps", str(args.adapt_steps),
            "--checkpoint.every_n_train_steps", str(args.adapt_steps), *shots, *common_args(args, run_root / "adapted")]


def cell(records: dict, prefix: str) -> str:
    values = [v[METRIC] for key, v in records.items() if key == prefix or key.startswith(prefix + "/")]
    if not values:
        return "—"
    mean = statistics.mean(values)
    return f"{mean:.3f}" + (f" (n={len(values)})" if prefix.count("/") > 1 or len(values) > 1 else "")


def write_table(records: dict, args: argparse.Namespace) -> None:
    shots = sorted({int(key.split("/k")[1].split("/")[0]) for key in records if "/k" in key} | set(args.shots))
    header = (["shift", "source-only"] + [f"k-only k={k}" for k in shots] + [f"source+k k={k}" for k in shots]
              + [f"adapted k={k}" for k in shots] + ["full target"])
    columns = (["source_only"] + [f"k_only/{{s}}/k{k}" for k in shots] + [f"source_plus_k/{{s}}/k{k}" for k in shots]
               + [f"adapted/{{s}}/k{k}" for k in shots] + ["full_target"])
    rows = []
    for shift in [*args.shifts, "mean"]:
        row = [shift]
        for column in columns:
            prefix = f"{column}/{shift}" if "{s}" not in column else column.format(s=shift)
            if shift == "mean":
                per_shift = [_mean(records, f"{column}/{s}" if "{s}" not in column else column.format(s=s))
                             for s in args.shifts]
                row.append(f"{statistics.mean(per_shift):.3f}" if per_shift and None not in per_shift else "—")
            else:
                row.append(cell(records, prefix))
        rows.append(row)
    title = (f"CS-Flow on surfaces/{args.category}, {args.image_size} px: target image AUROC, mean over the folds "
             f"run (n = number of folds averaged; source-only and full target have no folds)\n\n")
    Path(f"{args.out}.md").write_text(title + "\n".join(markdown_table(header, rows)) + "\n")


def _mean(records: dict, prefix: str) -> float | None:
    values = [v[METRIC] for key, v in records.items() if key == prefix or key.startswith(prefix + "/")]
    return statistics.mean(values) if values else None


def timing(args: argparse.Namespace) -> None:
    """Phase-1 fit time with and without the feature cache, and the phase-2 adaptation time for k=1."""
    run_root = Path(args.run_root)
    results = {}
    for cache in (True, False):
        timer = FitTimer()
        root = run_root / f"timing_cache_{str(cache).lower()}"
        run_fit([*source_config(args), *common_args(args, root), "--trainer.max_steps", "-1",
                 "--trainer.max_epochs", str(args.timing_epochs), "--trainer.limit_val_batches", "0",
                 "--model.init_args.cache_features", str(cache).lower()], timer, test=False)
        results[f"phase1_cache_{str(cache).lower()}"] = {"epochs_s": [round(t, 2) for t in timer.epochs],
                                                          "train_s": round(timer.total, 2)}
        print(results, flush=True)
    timer = FitTimer()
    if not list((run_root / "source_only").glob("csflow/*/version_*/checkpoints/last.ckpt")):
        run_job("fit", [*source_config(args), *common_args(args, run_root / "source_only")], run_root / "source_only")
    run_fit(adapt_command(args, run_root, ["--data.init_args.target.shift", "gray", "--data.init_args.target_shots", "1"]),
            timer, test=False)
    results["phase2_adapt_k1"] = {"steps": args.adapt_steps, "train_s": round(timer.total, 2)}
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/csflow_table", help="writes <out>.json and <out>.md")
    parser.add_argument("--run-root", default="runs/csflow_table_runs")
    parser.add_argument("--category", default="brick")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=SHIFTS)
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5, 10])
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--source-steps", type=int, default=120, help="optimizer steps of every phase-1 fit")
    parser.add_argument("--adapt-steps", type=int, default=20, help="optimizer steps of every adaptation")
    parser.add_argument("--timing", action="store_true", help="measure cache on/off and adaptation time instead")
    parser.add_argument("--timing-epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 px, 1 fold, k=1, 10 steps: a smoke run")
    parser.add_argument("extra", nargs="*", help="more cli.py overrides, after --")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.folds, args.shots, args.source_steps, args.adapt_steps = 64, [0], [1], 10, 3
    return args


if __name__ == "__main__":
    arguments = parse_args()
    timing(arguments) if arguments.timing else sweep(arguments)
