"""Preemption: SIGTERM or SIGUSR1 (what clusters send before taking a node) saves a checkpoint and exits."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

#: exit status of a preempted run (128 + SIGTERM), so requeue wrappers can tell it from a finished one.
PREEMPTED_EXIT_CODE = 143


class PreemptionCheckpoint(Callback):
    """At the first batch end after SIGTERM or SIGUSR1, writes ``last.ckpt``; the run then stops once that
    batch's metrics are logged (Lightning's SIGTERM exit), with status 143.

    Lightning already notes SIGTERM (``trainer.received_sigterm``). SIGUSR1 is handled here unless
    SLURM auto-requeue owns it (then Lightning saves an ``hpc_ckpt`` and requeues the job itself,
    and the requeued job, which keeps its ``slurm_<job id>`` run folder, resumes from it).
    """

    def __init__(self) -> None:
        self._requested = False
        self._previous_handler = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._requested = False
        environment = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if stage == "fit" and not slurm_requeue and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGUSR1, self._request)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def _request(self, signum, frame) -> None:
        self._requested = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        local = self._requested or trainer.received_sigterm
        # Every rank must agree, since saving a checkpoint is a collective call.
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        checkpoint = trainer.checkpoint_callback
        folder = Path(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else Path(
            trainer.default_root_dir) / "checkpoints"
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"Preempted at global step {trainer.global_step}: saved {path}. Continue with the same command and "
            f"--ckpt_path last."
        )
        # Every rank stops at the end of this batch, after its metrics are logged (Lightning raises
        # SIGTERMException there when this flag is set).
        trainer._signal_connector.received_sigterm = True
