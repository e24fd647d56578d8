"""Checkpoints never lose work: last.ckpt follows every epoch end, saves are atomic in their own folder,
damaged checkpoints are named with the good one left, a preemption on an epoch's last batch keeps its
validation, and a resumed run's files are numbered by attempt."""

from __future__ import annotations

import csv
import errno
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from callbacks.checkpointing import requeued_checkpoint
from cli import main
from tests.toy import ToyDetector

TOY = ["--model", "tests.test_checkpointing.FlatToy", "--data", "tests.toy.ToyDataModule", "--trainer.accelerator",
       "cpu", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--run.wandb",
       "false", "--trainer.log_every_n_steps", "1"]
EPOCH_STEPS = 8  # ToyDataModule: 32 training images, batches of 4


class FlatToy(ToyDetector):
    """The toy detector with a validation metric that never improves."""

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("val/flat", 1.0)


class LastCheckpointSteps(Callback):
    """Records the global step held by last.ckpt at the start of every epoch after the first and at the end."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def _record(self, trainer) -> None:
        path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        self.steps.append(torch.load(path, weights_only=True)["global_step"])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:
            self._record(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._record(trainer)


def fit(root: Path, *extra: str):
    return main(["fit", *TOY, "--run.root", str(root), *extra])


def run_folder(root: Path, version: int = 0) -> Path:
    return root / "toy" / "toy" / f"version_{version}"


@pytest.mark.parametrize("schedule", [["--checkpoint.monitor", "val/flat", "--checkpoint.mode", "max"],
                                      ["--checkpoint.every_n_epochs", "2"],
                                      ["--checkpoint.monitor", "val/flat", "--trainer.check_val_every_n_epoch", "2"]],
                         ids=["monitor_never_improves", "every_2_epochs", "validation_every_2_epochs"])
def test_last_checkpoint_follows_every_epoch_end(tmp_path, schedule):
    cli = fit(tmp_path, "--trainer.max_epochs", "3", *schedule,
              "--trainer.callbacks+=tests.test_checkpointing.LastCheckpointSteps")
    (recorder,) = [c for c in cli.trainer.callbacks if isinstance(c, LastCheckpointSteps)]
    assert recorder.steps == [EPOCH_STEPS, 2 * EPOCH_STEPS, 3 * EPOCH_STEPS]


def test_a_checkpoint_is_written_beside_its_target_and_renamed_into_place(tmp_path, monkeypatch):
    cli = fit(tmp_path, "--trainer.max_epochs", "1")
    last = run_folder(tmp_path) / "checkpoints" / "last.ckpt"
    moves = []
    for name in ("replace", "rename"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda src, dst, real=real: moves.append((Path(src), Path(dst))) or real(src, dst))
    cli.trainer.save_checkpoint(last)
    (source,) = [src for src, dst in moves if dst == last]
    assert source.parent == last.parent, f"staged in {source.parent}, another filesystem than {last.parent} may be"
    assert torch.load(last, weights_only=True)["global_step"] == EPOCH_STEPS


def test_full_disk_mid_write_keeps_the_previous_last_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    cli = fit(tmp_path, "--trainer.max_epochs", "1")
    folder = run_folder(tmp_path) / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_save = torch.save

    def disk_full(obj, file, *args, **kwargs):
        staged = __import__("io").BytesIO()
        real_save(obj, staged)
        half = staged.getvalue()[: len(staged.getvalue()) // 2]
        if hasattr(file, "write"):
            file.write(half)
            file.flush()
        else:
            Path(file).write_bytes(half)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cli.trainer.save_checkpoint(folder / "last.ckpt")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_resume_from_a_damaged_last_checkpoint_names_it_and_the_good_one_left(tmp_path):
    fit(tmp_path, "--trainer.max_epochs", "2")  # top-1 checkpoint of the newest epoch, and last.ckpt
    folder = run_folder(tmp_path) / "checkpoints"
    (epoch_checkpoint,) = [p for p in folder.glob("epoch=*.ckpt")]
    last = folder / "last.ckpt"
    data = bytearray(last.read_bytes())
    for damage in (data[: len(data) // 2], data[:-200] + bytes(200)):  # truncated; a tail overwritten
        last.write_bytes(bytes(damage))
        with pytest.raises(ValueError) as error:
            fit(tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last")
        message = str(error.value)
        assert f"{last}: not a torch checkpoint" in message and f"--ckpt_path {epoch_checkpoint}" in message
    data[len(data) // 2] ^= 0xFF  # zip structure intact, a weight's bytes flipped: caught by the CRC
    last.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its checksum"):
        fit(tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last")


def logged_per_epoch(folder: Path, key: str) -> dict[int, list[float]]:
    values: dict[int, list[float]] = {}
    for path in sorted(folder.glob("metrics*.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get(key):
                    values.setdefault(int(row["epoch"]), []).append(float(row[key]))
    return values


def test_sigterm_on_an_epochs_last_batch_validates_that_epoch_before_stopping(tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    fit(straight, "--trainer.max_epochs", "2")
    signal_args = ["--trainer.callbacks+=tests.toy.SignalAtStep", f"--trainer.callbacks.step={EPOCH_STEPS}"]
    with pytest.raises(SystemExit) as stopped:
        fit(preempted, "--trainer.max_epochs", "2", *signal_args)
    assert stopped.value.code == 143
    saved = torch.load(run_folder(preempted) / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == EPOCH_STEPS and saved["epoch"] == 0
    assert logged_per_epoch(run_folder(preempted), "val/loss") == {0: logged_per_epoch(run_folder(straight), "val/loss")[0]}
    fit(preempted, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert logged_per_epoch(run_folder(preempted), "val/loss") == logged_per_epoch(run_folder(straight), "val/loss")


def test_a_resumed_runs_files_are_numbered_by_attempt(tmp_path):
    for attempt, steps in enumerate((2, 4, 6), start=1):
        fit(tmp_path, "--trainer.max_steps", str(steps), *(["--ckpt_path", "last"] if attempt > 1 else []))
    folder = run_folder(tmp_path)
    for suffix, steps in ((".1", 2), (".2", 4), ("", 6)):
        assert yaml.safe_load((folder / f"config{suffix}.yaml").read_text())["trainer"]["max_steps"] == steps
        with (folder / f"metrics{suffix}.csv").open() as handle:
            assert max(int(row["step"]) for row in csv.DictReader(handle)) == steps - 1
    assert not (folder / "config.3.yaml").exists() and not (folder / "metrics.3.csv").exists()


def test_a_requeued_job_continues_from_a_consistent_checkpoint_and_says_which(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 1}, tmp_path / "hpc_ckpt_1.ckpt")  # Lightning's, saved mid-step
    (folder / ".last.ckpt.x1y2.partial").write_bytes(b"PK\x03\x04 cut short")
    torch.save({"global_step": 3}, folder / "epoch=0-step=3.ckpt")
    torch.save({"global_step": 4}, folder / "last.ckpt")
    with caplog.at_level(logging.INFO):
        assert requeued_checkpoint(tmp_path) == folder / "last.ckpt"
    assert "from last.ckpt" in caplog.text and "hpc_ckpt_1.ckpt" in caplog.text and ".partial" in caplog.text

    (folder / "last.ckpt").write_bytes(b"truncated")
    assert requeued_checkpoint(tmp_path) == folder / "epoch=0-step=3.ckpt"
    (folder / "epoch=0-step=3.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="hpc_ckpt_1.ckpt .*mid-step"):
        requeued_checkpoint(tmp_path)
    assert requeued_checkpoint(tmp_path / "fresh_job") is None
