"""ShiftAD command line: ``python cli.py fit|validate|test|predict --config configs/...``.

Every run lands in ``<run.root>/<method>/<data tag>/<version>/`` (config, CSV metrics, W&B files,
checkpoints, results and figures). A version folder is never reused, except by ``fit --ckpt_path
last``, which continues the newest run of the same method and data in place, and by a requeued SLURM
job, which continues its ``slurm_<job id>`` folder from its newest good checkpoint by itself. A continued
run keeps each earlier attempt's ``config.yaml`` and ``metrics.csv`` as ``config.<k>.yaml`` and
``metrics.<k>.csv`` (k = 1 for the first launch); the unsuffixed files are the latest attempt's.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

import datamodules  # noqa: F401  (registers the DataModules for --help and class_path lookup)
import lightning_modules  # noqa: F401  (registers the methods)
from callbacks import AnomalyMapGrid, ResultsWriter
from callbacks.checkpointing import (
    AtomicCheckpointIO,
    RunCheckpoint,
    check_checkpoint_file,
    keep_earlier_attempt,
    last_checkpoint,
    requeued_checkpoint,
)
from callbacks.preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint
from callbacks.tracking import build_loggers, wandb_loggers
from lightning_modules.base import ShiftADModule
from lightning_modules.components.sync_batchnorm import TimmSyncBatchNorm

RUN_DIR_ENV = "SHIFTAD_RUN_DIR"


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config into the run folder as ``config.yaml`` (a resumed run has moved the earlier
    attempts' aside, ``keep_earlier_attempt``) and to W&B."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in wandb_loggers(trainer.loggers):
            logger.experiment.config.update({"cli": config}, allow_val_change=True)


def _next_version(parent: Path) -> str:
    numbers = [int(m.group(1)) for p in parent.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return f"version_{max(numbers, default=-1) + 1}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-") or "run"


class ShiftADCLI(LightningCLI):
    def __init__(self, **kwargs) -> None:
        super().__init__(
            model_class=ShiftADModule,
            subclass_mode_model=True,
            datamodule_class=LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=RunConfigSaver,
            auto_configure_optimizers=False,
            seed_everything_default=0,
            trainer_defaults={"callbacks": [ResultsWriter(), AnomalyMapGrid(), PreemptionCheckpoint()]},
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        """Checks an explicit checkpoint file before Lightning reads its hyperparameters."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "best", "last", "hpc", "registry"):
            check_checkpoint_file(Path(ckpt_path))
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="Folder under which every run gets its own folder.")
        parser.add_argument("--run.version", type=str | None, default=None,
                            help="Name of the run folder; default: the next version_N (or slurm_<job id>).")
        parser.add_argument("--run.wandb", type=bool, default=True, help="Log to Weights & Biases (offline without login).")
        parser.add_argument("--run.wandb_project", type=str, default="shiftad", help="W&B project.")
        parser.add_argument("--run.log_model", type=bool, default=False, help="Upload checkpoints as W&B model artifacts.")
        parser.add_argument("--run.test_after_fit", type=bool, default=False,
                            help="After fit, test the best checkpoint (by checkpoint.monitor) or the final weights.")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")

    def _run_dir(self, method: str, tag: str) -> tuple[Path, Path | None]:
        """(run folder, checkpoint to resume or None) for this launch; every DDP rank gets the same."""
        config = self.config_init[self.subcommand]
        parent = Path(config["run"]["root"]) / _safe(method) / _safe(tag)
        ckpt_path = config.get("ckpt_path")
        resume = last_checkpoint(parent, method, tag) if ckpt_path == "last" else None
        if os.environ.get(RUN_DIR_ENV) and "LOCAL_RANK" in os.environ:  # a rank spawned by this launch
            return Path(os.environ[RUN_DIR_ENV]), resume
        if config["run"]["version"]:
            version = _safe(config["run"]["version"])
        elif resume is not None and self.subcommand == "fit":
            return resume.parent.parent, resume
        elif os.environ.get("SLURM_JOB_ID"):
            version = f"slurm_{os.environ['SLURM_JOB_ID']}"
            if self.subcommand == "fit" and ckpt_path is None:  # a requeued job continues its own folder
                return parent / version, requeued_checkpoint(parent / version)
        elif os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
            version = f"torchrun_{os.environ['TORCHELASTIC_RUN_ID']}"
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Ranks started together by an outside launcher cannot agree on "the next version" safely.
            raise ValueError(
                f"multi-process launch (WORLD_SIZE={os.environ['WORLD_SIZE']}) without a shared run name: pass "
                f"the same --run.version <name> to every rank, or use torchrun --rdzv-id <id>"
            )
        else:
            version = _next_version(parent)
        return parent / version, resume

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.config_init[self.subcommand]
        method = getattr(self.model, "method_name", type(self.model).__name__.lower())
        tag = getattr(self.datamodule, "run_tag", type(self.datamodule).__name__.lower())
        run_dir, resume = self._run_dir(method, tag)
        # Ranks started by Lightning's launcher inherit this, so they agree on the folder.
        os.environ[RUN_DIR_ENV] = str(run_dir)
        if resume is not None:
            config["ckpt_path"] = str(resume)
        if rank_zero_only.rank == 0:  # one process renames, even when every rank was started by srun or torchrun
            keep_earlier_attempt(run_dir)
        if config.get("weights_only") is None:
            config["weights_only"] = True  # a checkpoint file cannot run code
        checkpoint: RunCheckpoint = config["checkpoint"]
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(run_dir / "checkpoints")
        trainer_config = config["trainer"]
        if trainer_config.get("logger") in (None, True):
            describe = getattr(self.datamodule, "describe", dict)()
            tags = [method] + [f"{k}:{v}" for k, v in describe.items() if v is not None]
            tags.append(f"seed:{config['seed_everything']}")
            kwargs["logger"] = build_loggers(
                run_dir,
                run_name=f"{method}/{tag}/{run_dir.name}",
                tags=tags[:64],
                project=config["run"]["wandb_project"],
                use_wandb=config["run"]["wandb"],
                log_model=config["run"]["log_model"],
            )
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if trainer_config.get("sync_batchnorm") and not any(isinstance(plugin, LayerSync) for plugin in plugins):
            plugins.append(TimmSyncBatchNorm())  # torch's conversion drops timm's activations
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(plugin, ClusterEnvironment) for plugin in plugins):
            # PreemptionCheckpoint owns SIGUSR1: it saves at a batch boundary, then requeues.
            plugins.append(SLURMEnvironment(auto_requeue=False))
        kwargs["plugins"] = plugins
        kwargs["default_root_dir"] = str(run_dir)
        return super().instantiate_trainer(**kwargs)


    def after_fit(self) -> None:
        if not self.config_init[self.subcommand]["run"]["test_after_fit"]:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.monitor else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True)


def main(args: list[str] | None = None) -> ShiftADCLI:
    torch.set_float32_matmul_precision("high")
    inherited_run_dir = os.environ.get(RUN_DIR_ENV)  # set only in a rank spawned by a launch
    try:
        cli = ShiftADCLI(args=args)
    except SIGTERMException:
        sys.exit(PREEMPTED_EXIT_CODE)
    finally:
        # A later run in this process (a sweep, a notebook) must get its own folder, even after a DDP run
        # that left LOCAL_RANK behind or a run that failed.
        if inherited_run_dir is None:
            os.environ.pop(RUN_DIR_ENV, None)
    # Close the W&B run so its files are complete before the process (or the next in-process run) goes on.
    for logger in wandb_loggers(cli.trainer.loggers):
        if logger._experiment is not None:
            logger.experiment.finish()
    return cli


if __name__ == "__main__":
    main()
