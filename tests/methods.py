"""Every method as a tiny ``cli.py fit`` on the tiny surfaces build: the cases of the test matrix."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--run.wandb", "false", "--trainer.log_every_n_steps", "1"]


def config(path: str) -> list[str]:
    return ["--config", str(REPO / "configs" / path)]


@dataclass(frozen=True)
class Case:
    """One method (or mode) of the suite, shrunk to seconds.

    ``args(surfaces_root, run_root, context)`` gives the fit arguments without ``max_steps``; ``context``
    holds what a case needs from another one (the CS-Flow phase-1 checkpoint). ``batch_option`` is the
    key of the per-process batch size; ``batch_size`` its value in a 1-process run (a 2-process run
    halves it, so the global batch stays the same). ``steps`` is a short fit that crosses an epoch
    boundary where the method has one, ``preempt_at`` the step of the simulated preemption.
    """

    name: str
    method: str
    args: Callable[[Path, Path, dict], list[str]]
    steps: int
    preempt_at: int
    batch_option: str = "--data.init_args.batch_size"
    batch_size: int = 4
    ddp_strategy: str = "ddp"
    #: train loss keys whose 1-process and 2-process curves are compared (none for statistics-only fits)
    loss_key: str | None = "train/loss"
    #: relative tolerance of the mean training loss, 2 processes against 1 at the same global batch
    loss_rtol: float = 0.3
    #: False where the protocol has no validation data (few-shot adaptation sees k target images only)
    validates: bool = True


def dann_args(mode: str) -> Callable[[Path, Path, dict], list[str]]:
    def args(root: Path, runs: Path, context: dict) -> list[str]:
        extra = ["--model.init_args.pretrain_epochs", "1"] if mode == "adda" else []
        return [*config(f"dann/surfaces_{mode}.yaml"), *QUIET, "--data.init_args.source.root", str(root),
                "--data.init_args.source.category", "grass", "--data.init_args.image_size", "32",
                "--run.root", str(runs), *extra]
    return args


def csflow_args(root: Path, runs: Path, context: dict) -> list[str]:
    return [*config("csflow/source_surfaces.yaml"), *QUIET, "--data.init_args.source.root", str(root),
            "--data.init_args.image_size", "64", "--model.init_args.image_size", "64",
            "--model.init_args.hidden_channels", "8", "--trainer.check_val_every_n_epoch", "1",
            "--run.root", str(runs)]


def csflow_adapt_args(*recipe: str) -> Callable[[Path, Path, dict], list[str]]:
    """Paper 001's phase 2 (adapt_gray.yaml), with ShiftAD's recipe configs laid over it."""
    def args(root: Path, runs: Path, context: dict) -> list[str]:
        return [*config("csflow/adapt_gray.yaml"), *(part for path in recipe for part in config(path)), *QUIET,
                "--data.init_args.source.root", str(root), "--data.init_args.image_size", "64",
                "--data.init_args.target_shots", "2", "--model.init_args.source_checkpoint",
                str(context["csflow_source"]), "--run.root", str(runs)]
    return args


def meta_comparer_args(root: Path, runs: Path, context: dict) -> list[str]:
    return [*config("meta_comparer/surfaces.yaml"), *QUIET, "--data.init_args.source.root", str(root),
            "--data.init_args.domains", "[brick, grass, wood]", "--data.init_args.held_out", "wood",
            "--data.init_args.image_size", "64", "--model.init_args.num_query_patches", "32",
            "--model.init_args.num_reference_patches", "48",
            "--model.init_args.rank_pairs", "64", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--run.root", str(runs)]


def padim_args(root: Path, runs: Path, context: dict) -> list[str]:
    return [*config("trainer/default.yaml"), *config("padim/padim_surfaces.yaml"), *QUIET,
            "--data.init_args.source.root", str(root), "--data.init_args.image_size", "64",
            "--data.init_args.resize_size", "null", "--model.init_args.num_features", "12",
            "--model.init_args.blur_sigma", "2.0", "--run.root", str(runs)]


def gmm_pretrain_args(root: Path, runs: Path, context: dict) -> list[str]:
    return [*config("trainer/default.yaml"), *config("gmm_pretrain/gmm_surfaces.yaml"), *QUIET,
            "--data.init_args.pool", "surfaces", "--data.init_args.root", str(root),
            "--data.init_args.categories", "[brick, wood]", "--data.init_args.image_size", "32",
            "--data.init_args.train_samples", "24", "--data.init_args.val_samples", "4",
            "--data.init_args.test_samples", "6",
            "--data.init_args.num_gaussians", "4", "--model.init_args.num_gaussians", "4",
            "--model.init_args.figure_rows", "2", "--trainer.max_epochs", "null", "--run.root", str(runs)]


def densehybrid_args(root: Path, runs: Path, context: dict) -> list[str]:
    return [*config("trainer/default.yaml"), *config("densehybrid/surfaces.yaml"), *QUIET,
            "--data.init_args.source.root", str(root), "--data.init_args.source.category", "brick",
            "--data.init_args.image_size", "32", "--model.init_args.negatives.size", "24",
            "--model.init_args.negatives.segmentation", "slic", "--model.init_args.negatives.patch_size", "16",
            "--model.init_args.decoder_channels", "16", "--trainer.limit_val_batches", "1", "--run.root", str(runs)]


CASES = [
    Case("dann", "dann", dann_args("dann"), steps=5, preempt_at=2),
    # 3 source batches (1 step each), then 2 steps per adversarial batch: stopped inside the adversarial phase
    Case("adda", "adda", dann_args("adda"), steps=9, preempt_at=5, ddp_strategy="ddp_find_unused_parameters_true"),
    # no trainable BatchNorm: the curves differ only where the sampler pads an epoch's last batch
    Case("csflow", "csflow", csflow_args, steps=4, preempt_at=2, loss_rtol=0.01),
    Case("csflow_adapt", "csflow_adapt", csflow_adapt_args(), steps=3, preempt_at=1, batch_size=2,
         validates=False),
    # L2-SP, the shots' flips by step, and the safety rule at the final step, which a resume must reach alike
    Case("csflow_adapt_safe", "csflow_adapt", csflow_adapt_args("csflow/adapt_regularised.yaml"), steps=3,
         preempt_at=1, batch_size=2, validates=False),
    Case("csflow_flow_tuned", "csflow_adapt", csflow_adapt_args("csflow/adapt_flow.yaml"), steps=3, preempt_at=1,
         batch_size=2, validates=False),
    Case("meta_comparer", "meta_comparer", meta_comparer_args, steps=4, preempt_at=2),
    Case("padim", "padim", padim_args, steps=3, preempt_at=1, ddp_strategy="ddp_frozen", loss_key=None),
    Case("gmm_pretrain", "gmm_pretrain", gmm_pretrain_args, steps=4, preempt_at=2, batch_size=8),
    Case("densehybrid", "densehybrid", densehybrid_args, steps=4, preempt_at=2),
]


def logged(folder: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric over the run's metrics*.csv files."""
    values = {}
    for path in sorted(folder.glob("metrics*.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get(key):
                    values[int(row["step"])] = float(row[key])
    return values


def run_dir(runs: Path, case: Case, version: int = 0) -> Path:
    (found,) = (runs / case.method).glob(f"*/version_{version}")
    return found


def last_checkpoint(runs: Path, case: Case) -> Path:
    return run_dir(runs, case) / "checkpoints" / "last.ckpt"


def fit_args(case: Case, root: Path, runs: Path, context: dict, processes: int = 1) -> list[str]:
    """The case's fit arguments at its test length, with each of ``processes`` processes given its share of the
    batch."""
    steps = [] if case.loss_key is None else ["--trainer.max_steps", str(case.steps)]
    return [*case.args(root, runs, context), case.batch_option, str(case.batch_size // processes), *steps]


def results(folder: Path) -> dict[str, float]:
    return json.loads((folder / "results.json").read_text())["metrics"]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
