"""Preemption: SIGTERM or SIGUSR1 (what clusters send before taking a node) saves a checkpoint at a batch
boundary and exits with status 143; under SLURM, SIGUSR1 also requeues the job."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from callbacks.checkpointing import LAST_CHECKPOINT, RunCheckpoint

#: exit status of a preempted run (128 + SIGTERM), so requeue wrappers can tell it from a finished one.
PREEMPTED_EXIT_CODE = 143


class PreemptionCheckpoint(Callback):
    """Stops a fit cleanly on SIGTERM or SIGUSR1, with ``last.ckpt`` written at a batch boundary.

    - SIGTERM is noted by Lightning (``trainer.received_sigterm``), SIGUSR1 here.
    - At the end of the batch in progress, ``last.ckpt`` is written and the run stops once that batch's
      metrics are logged (Lightning's SIGTERM exit), with status 143.
    - On an epoch's last batch the run goes on through the epoch's validation and end first (stopping there
      would skip that validation) and stops after them, ``last.ckpt`` then holding the epoch end.
    - Under SLURM, SIGUSR1 (``sbatch --signal=SIGUSR1@<seconds>``) then runs ``scontrol requeue
      $SLURM_JOB_ID``. The requeued job runs the same command, gets the same ``slurm_<job id>`` folder and
      continues from that ``last.ckpt`` (``cli.py``). The CLI switches off Lightning's own SLURM handler,
      which saves inside the signal handler, in the middle of a step.
    """

    def __init__(self) -> None:
        self._usr1 = False
        self._stop_at_epoch_end = False
        self._requeue = False
        self._previous_handler = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._usr1 = self._stop_at_epoch_end = self._requeue = False
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGUSR1, self._note_usr1)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def _note_usr1(self, signum, frame) -> None:
        self._usr1 = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._stop_at_epoch_end:
            return
        # Every rank must agree, since saving a checkpoint is a collective call.
        if not trainer.strategy.reduce_boolean_decision(self._usr1 or trainer.received_sigterm, all=False):
            return
        in_slurm = isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
        self._requeue = in_slurm and trainer.strategy.reduce_boolean_decision(self._usr1, all=False)
        path = _last_path(trainer)
        trainer.save_checkpoint(path)  # a kill before the stop below still finds this batch boundary
        if trainer.fit_loop.epoch_loop._num_ready_batches_reached():
            # Lightning's evaluation loop stops at its first batch while this flag is up.
            self._stop_at_epoch_end = True
            trainer._signal_connector.received_sigterm = False
            return
        self._stop(trainer, path, f"global step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._stop_at_epoch_end:
            return
        path = _last_path(trainer)
        checkpoint = trainer.checkpoint_callback
        if not (isinstance(checkpoint, RunCheckpoint) and checkpoint.save_last):
            trainer.save_checkpoint(path)  # otherwise RunCheckpoint writes the epoch end, after every hook
        self._stop(trainer, path, f"global step {trainer.global_step}, after the end of epoch {trainer.current_epoch}")

    def _stop(self, trainer: Trainer, path: Path, where: str) -> None:
        message = f"Preempted at {where}: saved {path}. "
        if self._requeue:
            message += _requeue_slurm_job() if trainer.is_global_zero else ""
        else:
            message += "Continue with the same command and --ckpt_path last."
        rank_zero_info(message)
        # Every rank stops once this batch's metrics are logged, or after the epoch end hooks (Lightning raises
        # SIGTERMException there when this flag is set).
        trainer._signal_connector.received_sigterm = True


def _last_path(trainer: Trainer) -> Path:
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.dirpath:
        return Path(checkpoint.dirpath) / LAST_CHECKPOINT
    return Path(trainer.default_root_dir) / "checkpoints" / LAST_CHECKPOINT


def _requeue_slurm_job() -> str:
    """Runs ``scontrol requeue $SLURM_JOB_ID``; returns what happened and how to continue."""
    job = os.environ.get("SLURM_JOB_ID", "")
    by_hand = (f"Resubmit the job script with --ckpt_path last added to the command; it continues the run in "
               f"slurm_{job} in place.")
    if not job:
        return f"No SLURM_JOB_ID to requeue. {by_hand}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return f"Could not requeue SLURM job {job}: scontrol is not on PATH. {by_hand}"
    except subprocess.TimeoutExpired:
        return f"Could not requeue SLURM job {job}: scontrol requeue did not answer within 120 s. {by_hand}"
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        return f"Could not requeue SLURM job {job}: scontrol requeue {job} failed ({reason}). {by_hand}"
    return (f"Requeued SLURM job {job} (scontrol requeue {job}); the requeued job continues from this checkpoint "
            f"by itself.")
