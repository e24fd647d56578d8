"""A minimal method and DataModule for testing the CLI, tracking and resume machinery."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_modules.base import AnomalyDetectionModule


class ToyImages(Dataset):
    """Random 16 px images; anomalous ones carry a bright square, with its mask."""

    def __init__(self, size: int, anomalous_fraction: float, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, 3, 16, 16, generator=generator) * 0.5
        self.labels = (torch.rand(size, generator=generator) < anomalous_fraction).long()
        self.masks = torch.zeros(size, 1, 16, 16)
        self.masks[self.labels == 1, :, 4:9, 4:9] = 1.0
        self.images = torch.where(self.masks.bool(), torch.ones_like(self.images), self.images)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "label": int(self.labels[index]),
            "mask": self.masks[index],
            "has_mask": True,
            "defect_type": "square" if self.labels[index] else "good",
            "domain": "toy",
            "domain_index": 0,
            "path": f"toy/{self.seed}/{index}.png",
        }


class ToyDataModule(LightningDataModule):
    def __init__(self, batch_size: int = 4, train_size: int = 32, test_size: int = 24) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_size = train_size
        self.test_size = test_size

    @property
    def run_tag(self) -> str:
        return "toy"

    def describe(self) -> dict:
        return {"dataset": "toy", "batch_size": self.batch_size}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ToyImages(self.train_size, 0.0, seed=1), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ToyImages(8, 0.0, seed=2), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(ToyImages(self.test_size, 0.5, seed=3), batch_size=self.batch_size)


class ToyDetector(AnomalyDetectionModule):
    """A per-pixel autoencoder; the reconstruction error is the anomaly map."""

    method_name = "toy"

    def __init__(self, hidden: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Conv2d(3, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 3, 1))

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = (self.net(images) - images).pow(2).mean(1)
        return maps.flatten(1).amax(1), maps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        return self.checked_total({"reconstruction": (self.net(images) - images).pow(2).mean()})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        self.log("val/loss", (self.net(images) - images).pow(2).mean())


class KillAtStep(Callback):
    """Ends the process abruptly (no clean-up, like a killed job) once ``step`` is reached."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os._exit(3)


def progress(trainer, unit: str) -> int:
    """Optimizer steps (``global_step``) or training batches so far (for methods without an optimizer)."""
    return trainer.global_step if unit == "step" else trainer.fit_loop.total_batch_idx + 1


class SignalAtStep(Callback):
    """Sends the process a signal (as a cluster does before preemption) once ``step`` is reached.

    ``mid_step`` sends it inside the next training step instead: once ``training_step`` has returned (its
    BatchNorm and streaming statistics updated), before the optimizer step and before Lightning counts the
    batch, as a signal from outside may arrive. With ``sent_marker`` (a file path) only the first launch sends
    it: a requeued job runs the same command.
    """

    def __init__(self, step: int, signal_name: str = "SIGTERM", unit: str = "step", mid_step: bool = False,
                 sent_marker: str | None = None) -> None:
        self.step = step
        self.signal_number = getattr(signal, signal_name)
        self.unit = unit
        self.mid_step = mid_step
        self.sent_marker = Path(sent_marker) if sent_marker else None
        self.sent = self.sent_marker is not None and self.sent_marker.exists()

    def _send(self) -> None:
        self.sent = True
        if self.sent_marker is not None:
            self.sent_marker.touch()
        os.kill(os.getpid(), self.signal_number)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.mid_step or self.sent or progress(trainer, self.unit) < self.step:
            return
        step = pl_module.training_step

        def step_then_signal(*args, **kwargs):
            output = step(*args, **kwargs)
            del pl_module.training_step  # back to the class's method
            self._send()
            return output

        pl_module.training_step = step_then_signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.mid_step and not self.sent and progress(trainer, self.unit) >= self.step:
            self._send()


def poison(value, min_dims: int = 0):
    """Every floating tensor of at least ``min_dims`` dimensions in a (nested) batch filled with NaN, in place."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= min_dims:
        value.fill_(float("nan"))
    elif isinstance(value, dict):
        for item in value.values():
            poison(item, min_dims)
    elif isinstance(value, (list, tuple)):
        for item in value:
            poison(item, min_dims)


class PoisonAtStep(Callback):
    """Makes training non-finite once ``step`` is reached: ``batch`` fills the images of the next batch with
    NaN (a corrupt input), ``weights`` fills every floating parameter and buffer with NaN after a step (a diverged update)."""

    def __init__(self, step: int, target: str = "batch", unit: str = "step") -> None:
        if target not in ("batch", "weights"):
            raise ValueError(f"target must be 'batch' or 'weights', got {target!r}")
        self.step = step
        self.target = target
        self.unit = unit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.target == "batch" and progress(trainer, self.unit) >= self.step:
            poison(batch, min_dims=4)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.target == "weights" and progress(trainer, self.unit) >= self.step:
            with torch.no_grad():
                poison(list(pl_module.parameters()) + [b for b in pl_module.buffers() if b.is_floating_point()])
