"""Training and test throughput (images/s) and peak accelerator memory of a run.

Add it to any method: ``--trainer.callbacks+=callbacks.throughput.ThroughputMeter``. It writes
``throughput.json`` to the run folder and logs ``perf/train_images_per_s`` at each epoch end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


def count_images(batch) -> int:
    """Images in a batch: every floating tensor shaped [..., 3, H, W] counts its leading entries.

    Masks ([..., 1, H, W]) and labels do not count; a [B, R, 3, H, W] reference stack counts B·R.
    """
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point() and batch.dim() >= 4 and batch.shape[-3] == 3:
            return int(batch.shape[:-3].numel())
        return 0
    if isinstance(batch, dict):
        return sum(count_images(value) for value in batch.values())
    if isinstance(batch, list | tuple):
        return sum(count_images(value) for value in batch)
    return 0


class _Stopwatch:
    """Wall time over the batches of one loop, skipping the first ``warmup`` batches (compilation,
    cuDNN autotuning, worker start-up) and anything run between the loop's segments (validation)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seen = 0
        self.images = 0
        self.batches = 0
        self.seconds = 0.0
        self._started: float | None = None

    def batch_start(self, device: torch.device) -> None:
        if self.seen >= self.warmup and self._started is None:
            _synchronize(device)
            self._started = time.perf_counter()

    def batch_end(self, batch) -> None:
        self.seen += 1
        if self._started is not None:
            self.images += count_images(batch)
            self.batches += 1

    def pause(self, device: torch.device) -> None:
        if self._started is not None:
            _synchronize(device)
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def summary(self, world_size: int) -> dict:
        per_process = self.images / self.seconds if self.seconds > 0 else None
        return {"timed_batches": self.batches, "warmup_batches": min(self.seen, self.warmup),
                "images_per_batch": self.images / self.batches if self.batches else None,
                "seconds": round(self.seconds, 3),
                "images_per_s": None if per_process is None else round(per_process * world_size, 2)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ThroughputMeter(Callback):
    """Measures end-to-end throughput, data loading included: images per second over the timed training
    batches (validation excluded) and over the test batches, summed over processes, and the peak memory
    allocated on the accelerator by this process.

    Args:
        warmup_batches: training batches that are not timed.
        test_warmup_batches: test batches that are not timed (test sets are often a few batches).
    """

    def __init__(self, warmup_batches: int = 5, test_warmup_batches: int = 1) -> None:
        if warmup_batches < 0 or test_warmup_batches < 0:
            raise ValueError(f"ThroughputMeter needs warmup_batches >= 0 and test_warmup_batches >= 0, got "
                             f"{warmup_batches}, {test_warmup_batches}")
        self.warmup_batches = warmup_batches
        self.test_warmup_batches = test_warmup_batches
        self._train = _Stopwatch(warmup_batches)
        self._test = _Stopwatch(test_warmup_batches)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._train = _Stopwatch(self.warmup_batches)
        if stage == "test":
            self._test = _Stopwatch(self.test_warmup_batches)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._train.batch_start(pl_module.device)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._train.batch_end(batch)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train.pause(pl_module.device)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train.pause(pl_module.device)
        rate = self._train.summary(trainer.world_size)["images_per_s"]
        if rate is not None:
            pl_module.log("perf/train_images_per_s", rate, rank_zero_only=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train.pause(pl_module.device)
        self._write(trainer, pl_module, "train", self._train)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._test.batch_start(pl_module.device)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._test.batch_end(batch)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._test.pause(pl_module.device)
        self._write(trainer, pl_module, "test", self._test)

    def _write(self, trainer: Trainer, pl_module: LightningModule, loop: str, stopwatch: _Stopwatch) -> None:
        entry = stopwatch.summary(trainer.world_size)
        device = pl_module.device
        entry["peak_memory_mib"] = (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                                    if device.type == "cuda" else None)
        entry.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                     precision=str(trainer.precision), world_size=trainer.world_size)
        if not trainer.is_global_zero or trainer.log_dir is None:
            return
        path = Path(trainer.log_dir) / "throughput.json"
        found = json.loads(path.read_text()) if path.is_file() else {}
        found[loop] = entry
        path.write_text(json.dumps(found, indent=2) + "\n")
        rank_zero_info(f"Throughput ({loop}): {entry['images_per_s']} images/s over {entry['timed_batches']} "
                       f"batches; peak accelerator memory {entry['peak_memory_mib']} MiB -> {path}")
