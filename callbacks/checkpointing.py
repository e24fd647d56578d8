"""Checkpoints that never lose work, and the choice of the checkpoint a run continues from.

- :class:`AtomicCheckpointIO` writes every checkpoint (ModelCheckpoint, the preemption save,
  ``trainer.save_checkpoint``) to a temp file in the checkpoint's own folder and renames it into place, so a
  full disk or a kill mid-write leaves the previous file whole.
- :class:`RunCheckpoint` is Lightning's ModelCheckpoint with ``last.ckpt`` rewritten at every epoch end,
  whatever the monitored metric does.
- :func:`last_checkpoint` (``--ckpt_path last``) and :func:`requeued_checkpoint` (a SLURM job requeued into
  its ``slurm_<job id>`` folder) pick the checkpoint to continue from, check it, and say which and why.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

LAST_CHECKPOINT = "last.ckpt"
#: suffix of a checkpoint being written; such a file is never resumed from
PARTIAL_SUFFIX = ".partial"
#: checkpoints that Lightning's SLURM handler writes inside the signal handler, at an arbitrary point of a step
LIGHTNING_HPC_PATTERN = "hpc_ckpt_*.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to ``.<name>.<random>.partial`` beside it, syncs it to disk, then renames it over
    the old file (atomic within one filesystem). Lightning's own save stages the file in the system temp
    folder, often another filesystem, where the final move is a copy that a full disk truncates."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power loss
        finally:
            os.close(folder)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that rewrites ``last.ckpt`` (in place: no version counter) at the end of every training
    epoch, after the epoch's validation and hooks.

    Lightning 2.6 writes ``last.ckpt`` only together with a top-k checkpoint, so once the monitored metric
    stops improving (or between ``every_n_epochs`` saves) ``last.ckpt`` stays behind, and a resume silently
    repeats the epochs since.
    """

    def __init__(self, *args, save_last: bool | str | None = True, enable_version_counter: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, save_last=save_last, enable_version_counter=enable_version_counter, **kwargs)
        self._saved_last_now = False

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._saved_last_now = True

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        fit_loop = trainer.fit_loop
        in_epoch_end = fit_loop.epoch_progress.current.processed > fit_loop.epoch_progress.current.completed
        if in_epoch_end and fit_loop._iteration_based_training() and fit_loop.epoch_loop._num_ready_batches_reached():
            # Saved in the hooks of an epoch that used up its batches, in a max_steps run. Lightning resumes that
            # state through a second epoch end, which sets the next epoch's sampler one epoch ahead (other
            # batches: not an exact resume) and shifts the logged steps by one. The counters are written as at
            # the end of the epoch's last batch instead (epoch not yet counted, that batch not yet completed,
            # the step counter before its increment), a state Lightning restores exactly.
            loops = checkpoint["loops"]["fit_loop"]
            for counts in (loops["epoch_progress"]["current"], loops["epoch_progress"]["total"]):
                counts["processed"] = counts["completed"]
            for counts in (loops["epoch_loop.batch_progress"]["current"], loops["epoch_loop.batch_progress"]["total"]):
                counts["completed"] -= 1
            loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._saved_last_now = False
        super().on_train_epoch_end(trainer, pl_module)
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if self.save_last and fitting and not trainer.fast_dev_run and not self._saved_last_now:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be loaded, or None: missing, or not a complete torch archive (truncated, or a member
    that fails its CRC). Reads the whole file once; no code in it runs."""
    if not path.is_file():
        return "no such checkpoint file"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "not a torch checkpoint (corrupt or truncated file?)"
    if damaged is not None:
        return f"not a torch checkpoint: its member {damaged!r} fails its checksum (corrupt file?)"
    return None


def check_checkpoint_file(path: Path) -> None:
    """``--ckpt_path <file>``: stops with the file named when it is missing or damaged."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise (ValueError if path.exists() else FileNotFoundError)(f"--ckpt_path {path}: {problem}")


def _newest_first(paths) -> list[Path]:
    return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)


def _good_checkpoints(folder: Path, exclude: Path | None = None) -> list[Path]:
    """The loadable ``*.ckpt`` of a checkpoints folder, newest first."""
    return [p for p in _newest_first(folder.glob("*.ckpt")) if p != exclude and checkpoint_problem(p) is None]


def last_checkpoint(parent: Path, method: str, tag: str) -> Path:
    """``--ckpt_path last``: the newest ``*/checkpoints/last.ckpt`` under ``parent``, checked as an explicit
    path is. A damaged one stops the run, naming it and the newest good checkpoint left (in its own run
    first, then in the other runs of this method and data)."""
    candidates = _newest_first(parent.glob(f"*/checkpoints/{LAST_CHECKPOINT}"))
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no run of {method!r} on {tag!r} has a checkpoint yet "
            f"(looked for */checkpoints/{LAST_CHECKPOINT} under {parent}); start it without --ckpt_path"
        )
    newest = candidates[0]
    problem = checkpoint_problem(newest)
    if problem is None:
        return newest
    others = _good_checkpoints(newest.parent, exclude=newest) + [p for p in candidates[1:] if checkpoint_problem(p) is None]
    offer = (f"the newest good checkpoint is {others[0]}: continue from it with --ckpt_path {others[0]} (a new run "
             f"folder), or move {newest.name} aside" if others else
             "no other good checkpoint of this method and data exists; start again without --ckpt_path")
    raise ValueError(f"--ckpt_path last: {newest}: {problem}; {offer}")


def requeued_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a requeued SLURM job continues from in its own run folder, or None for a first start.

    ``last.ckpt`` if it loads, else the newest other good ``checkpoints/*.ckpt``. Never Lightning's
    ``hpc_ckpt_*`` (saved inside a signal handler, mid-step: a resume from it is not exact) nor a ``.partial``
    file (a save that never finished). Logs the choice and what was passed over.
    """
    folder = run_dir / "checkpoints"
    skipped = [f"{p.name} (a save that never finished)" for p in folder.glob(f"*{PARTIAL_SUFFIX}")]
    hpc = sorted(run_dir.glob(LIGHTNING_HPC_PATTERN))
    skipped += [f"{p.name} (written by Lightning's SLURM handler mid-step: not an exact resume point)" for p in hpc]
    last = folder / LAST_CHECKPOINT
    problem = checkpoint_problem(last) if last.exists() else None
    if problem is not None:
        skipped.append(f"{LAST_CHECKPOINT} ({problem})")
    chosen, why = None, ""
    if last.exists() and problem is None:
        chosen, why = last, "the state at the last batch boundary or epoch end"
    elif good := _good_checkpoints(folder, exclude=last):
        chosen, why = good[0], "the newest good checkpoint, as last.ckpt is missing or damaged"
    passed_over = f"; passed over: {', '.join(skipped)}" if skipped else ""
    if chosen is not None:
        rank_zero_info(f"SLURM requeue: continuing {run_dir} from {chosen.name}, {why}{passed_over}")
        return chosen
    if skipped:
        raise FileNotFoundError(
            f"SLURM requeue of {run_dir}: no checkpoint to continue from exactly{passed_over}. Move these aside to "
            f"start the job afresh, or pass --ckpt_path <file> to continue from one of them anyway"
        )
    return None


def keep_earlier_attempt(run_dir: Path) -> None:
    """Before a resumed run writes into its folder: the previous attempt's ``metrics.csv`` and ``config.yaml``
    become ``metrics.<k>.csv`` and ``config.<k>.yaml``, with k its attempt number (1 = the first launch), so the
    unsuffixed files are always the latest attempt's and a suffix means the same attempt in both."""
    attempt = 1
    while (run_dir / f"metrics.{attempt}.csv").exists() or (run_dir / f"config.{attempt}.yaml").exists():
        attempt += 1
    for stem, suffix in (("metrics", ".csv"), ("config", ".yaml")):
        latest = run_dir / f"{stem}{suffix}"
        if latest.is_file():
            latest.rename(run_dir / f"{stem}.{attempt}{suffix}")
