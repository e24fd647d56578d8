"""Paper 000's Table 2 on the embedded "surfaces" data: target accuracy of source_only, adabn, dann, adda.

Every job is one ``python cli.py fit ... --run.test_after_fit true`` with ``configs/dann/surfaces_<mode>.yaml``
(model selection on the source val split); ``--jobs N`` runs N at a time (a GPU machine). Directions: ``gray_to_rgb`` (paper 000:
labelled grayscale source, unlabelled RGB target) and ``rgb_to_gray``. Seeds change the training seed
(``seed_everything``); the data split stays ``data.seed = 0`` so every seed is scored on the same images.

    python benchmarks/dann_table.py --out docs/results/dann_table            # full: 6 categories x 3 seeds
    python benchmarks/dann_table.py --quick --out runs/dann_table_quick       # 2 categories, 1 seed

Results are merged into ``<out>.json`` after every job (under a file lock, so two sweeps may share it), and a
job already there is skipped, so an interrupted sweep continues where it stopped. ``<out>.md`` holds the tables
(mean ± std over seeds).

``adabn`` trains exactly as ``source_only`` does (same steps, same seed, same selected checkpoint), so its job
is ``cli.py test`` of the ``source_only`` job's selected checkpoint, relabelled ``mode: adabn`` (test re-estimates
the target statistics). Only where that checkpoint is not on disk does it fit on its own.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.runner import (  # noqa: E402
    Ledger,
    markdown_table,
    mean_std,
    relabelled_checkpoint,
    run_cli,
    tested_checkpoint,
)
from datamodules.surfaces import SURFACES_CATEGORIES  # noqa: E402

MODES = ("source_only", "adabn", "dann", "adda")
DIRECTIONS = {"gray_to_rgb": ("gray", "none"), "rgb_to_gray": ("none", "gray")}
# AdaBN records measured before this are re-measured: first statistics from the shuffled, augmented training
# loader, then per-batch variances averaged (momentum=None) instead of each layer's exact input moments.
ADABN_STATISTICS = "target train split, dataset order, not augmented, exact moments layer by layer"


def job_key(direction: str, category: str, mode: str, seed: int) -> str:
    return f"{direction}/{category}/{mode}/{seed}"


def record_key(record: dict) -> str:
    return job_key(record["direction"], record["category"], record["mode"], record["seed"])


def source_only_of(job: tuple[str, str, str, int]) -> tuple[str, str, str, int]:
    direction, category, _, seed = job
    return direction, category, "source_only", seed


def run_job(direction: str, category: str, mode: str, seed: int, args: argparse.Namespace,
            checkpoint: Path | None = None) -> dict:
    """One fit + test; with ``checkpoint`` (adabn only), a test of that source_only checkpoint instead."""
    source_shift, target_shift = DIRECTIONS[direction]
    run_root = Path(args.run_root) / direction / mode / f"seed{seed}" / category
    data = ["--config", "configs/trainer/default.yaml", "--config", f"configs/dann/surfaces_{mode}.yaml",
            "--data.init_args.source.category", category, "--data.init_args.source.shift", source_shift,
            "--data.init_args.target.shift", target_shift,
            *(["--data.init_args.image_size", str(args.image_size)] if args.image_size else []),
            "--seed_everything", str(seed), "--run.root", str(run_root), "--run.wandb", "false",
            "--trainer.enable_progress_bar", "false"]
    if checkpoint is None:
        run = run_cli("fit", [*data, "--run.test_after_fit", "true",
                              *(["--trainer.max_epochs", str(args.epochs)] if args.epochs else []), *args.extra],
                      run_root)
    else:
        relabelled = relabelled_checkpoint(checkpoint, run_root / "source_only_as_adabn.ckpt", mode="adabn")
        try:
            run = run_cli("test", [*data, "--ckpt_path", str(relabelled), *args.extra], run_root)
        finally:
            relabelled.unlink()
    record = {"direction": direction, "category": category, "mode": mode, "seed": seed, **run.cost(),
              **run.metrics}
    if mode == "adabn":
        record["adabn_statistics"] = ADABN_STATISTICS
        if checkpoint is not None:
            record["derived_from"] = str(checkpoint)
    return record


def is_current(record: dict) -> bool:
    return record["mode"] != "adabn" or record.get("adabn_statistics") == ADABN_STATISTICS


def percent(values: list[float]) -> str:
    return mean_std(values, scale=100, digits=2)


def tables(records: list[dict]) -> str:
    """The ledger's tables, with a column for every mode it records, whichever modes the last sweep ran."""
    records = [r for r in records if is_current(r)]
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    out = []
    for direction in DIRECTIONS:
        rows = [r for r in records if r["direction"] == direction]
        if not rows:
            continue
        categories = [c for c in SURFACES_CATEGORIES if any(r["category"] == c for r in rows)]
        # The mean row averages whole seeds only: a seed counts once every mode has every category, so
        # each per-seed mean covers the same categories and a cut sweep's row stays comparable.
        seeds = sorted({r["seed"] for r in rows})
        done = {(r["category"], r["mode"], r["seed"]) for r in rows}
        complete = [s for s in seeds if all((c, m, s) in done for c in categories for m in modes)]
        for metric, title in (("target/accuracy", "target test accuracy (%)"),
                              ("target/auroc", "target test AUROC (%)"),
                              ("source/accuracy", "source test accuracy (%)")):
            out.append(f"### {direction.replace('_to_', ' → ')}: {title}, mean ± std over seeds\n")
            table = [[category, *(percent([r[metric] for r in rows if r["category"] == category
                                           and r["mode"] == m and metric in r]) for m in modes)]
                     for category in categories]
            label = f"seeds {', '.join(map(str, complete))}" if complete else "no seed complete"
            table.append([f"**mean** ({label})", *(percent([statistics.mean(
                r[metric] for r in rows if r["mode"] == mode and r["seed"] == s and metric in r)
                for s in complete]) for mode in modes)])
            out += markdown_table(["category", *modes], table)
            out[-1] += "\n"
    seconds = [r["seconds"] for r in records]
    if seconds:
        out.append(f"Fit + test wall time per job: median {statistics.median(seconds):.0f} s "
                   f"(min {min(seconds):.0f}, max {max(seconds):.0f}, {len(seconds)} jobs).\n")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/dann_table", help="writes <out>.json and <out>.md")
    parser.add_argument("--run-root", default="runs/dann_table_runs", help="run folders of the jobs")
    parser.add_argument("--categories", nargs="+", default=list(SURFACES_CATEGORIES), choices=SURFACES_CATEGORIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="modes to run; the tables show every mode the ledger holds")
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    parser.add_argument("--image-size", type=int, default=None, help="override data.image_size of the configs")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs of the configs")
    parser.add_argument("--jobs", type=int, default=1, help="jobs run at the same time")
    parser.add_argument("--quick", action="store_true", help="2 categories (brick, woven) and seed 0 only")
    parser.add_argument("--table-only", action="store_true", help="rewrite <out>.md from <out>.json, run nothing")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more cli.py arguments, last")
    args = parser.parse_args()
    if args.quick:
        args.categories, args.seeds = ["brick", "woven"], [0]
    out = Path(args.out)
    ledger = Ledger(out.with_suffix(".json"), record_key, is_current)
    if args.table_only and not ledger.path.is_file():
        raise SystemExit(f"--table-only: no ledger {ledger.path} (give the --out of an earlier sweep)")
    records = ledger.merge()
    done = {record_key(r) for r in records if is_current(r)}
    if args.table_only:
        table = tables(records)
        out.with_suffix(".md").write_text(table)
        print(table)
        return
    # Seed-major order: a sweep cut short still has whole seeds for every category and mode.
    jobs = [(direction, category, mode, seed) for seed in args.seeds for direction in args.directions
            for category in args.categories for mode in args.modes
            if job_key(direction, category, mode, seed) not in done]
    by_key = {record_key(r): r for r in records}
    failures = []
    # Jobs are handed to the pool one free slot at a time, so an adabn test whose source_only job has just
    # finished goes next rather than behind the whole queue.
    queue = collections.deque(job for job in jobs if not (job[2] == "adabn" and source_only_of(job) in jobs))
    waiting = {source_only_of(job): job for job in jobs if job not in queue}  # adabn jobs after their fit
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {}

        def submit_next() -> None:
            while queue and len(futures) < args.jobs:
                job = queue.popleft()
                current = ledger.claim(job_key(*job))
                if current is None:  # another sweep on this ledger finished it or runs it, with its adabn test
                    print(f"{job_key(*job)}: finished or running in another sweep on {ledger.path}, skipped",
                          flush=True)
                    waiting.pop(job, None)
                    continue
                by_key.update((record_key(r), r) for r in current)
                source_only = by_key.get(job_key(*source_only_of(job)))
                checkpoint = tested_checkpoint(source_only["run_dir"]) if job[2] == "adabn" and source_only else None
                futures[pool.submit(run_job, *job, args, checkpoint)] = job

        submit_next()
        while futures:
            finished, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                job = futures.pop(future)
                if future.exception() is not None:  # the others go on; the ledger keeps what finished
                    ledger.release(job_key(*job))
                    failures.append(str(future.exception()))
                    print(failures[-1], flush=True)
                else:
                    record = future.result()
                    by_key[job_key(*job)] = record
                    records = ledger.merge([record])
                    print(f"{job_key(*job)}: target {record['target/accuracy']:.4f} "
                          f"source {record['source/accuracy']:.4f} ({record['seconds']:.0f} s)", flush=True)
                    out.with_suffix(".md").write_text(tables(records))
                if job in waiting:  # without a checkpoint (the fit failed) the adabn job fits on its own
                    queue.appendleft(waiting.pop(job))
            submit_next()
    print(tables(records))
    if failures:
        raise SystemExit(f"{len(failures)} job(s) failed; rerun the same command to retry them")


if __name__ == "__main__":
    main()
