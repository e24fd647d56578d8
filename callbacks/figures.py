"""Figures a run writes to its folder and to W&B."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

from callbacks.tracking import wandb_loggers  # noqa: E402


def save_figure(trainer: Trainer, figure: plt.Figure, name: str) -> Path:
    """Saves ``figure`` as ``<run folder>/<name>.png`` and logs it to W&B under ``name``."""
    path = Path(trainer.default_root_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    for logger in wandb_loggers(trainer.loggers):
        logger.log_image(key=name, images=[str(path)], step=trainer.global_step)
    return path


def anomaly_map_figure(images: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor) -> plt.Figure:
    """Rows of (input, ground truth, anomaly map); maps share one colour scale."""
    rows = images.shape[0]
    figure, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    low, high = float(maps.min()), float(maps.max())
    for row in range(rows):
        panels = (images[row].permute(1, 2, 0).clamp(0, 1), masks[row], maps[row])
        for col, (panel, title) in enumerate(zip(panels, ("input", "ground truth", "anomaly map"), strict=True)):
            ax = axes[row, col]
            kwargs = {"vmin": low, "vmax": high, "cmap": "jet"} if col == 2 else {"cmap": "gray"}
            ax.imshow(panel.numpy(), **kwargs)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


class AnomalyMapGrid(Callback):
    """After ``test``: the anomaly maps a detector kept (``map_examples``) as ``anomaly_maps.png``."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        examples = getattr(pl_module, "map_examples", None)
        if not trainer.is_global_zero or not examples:
            return
        save_figure(trainer, anomaly_map_figure(examples["image"], examples["mask"], examples["map"]), "anomaly_maps")
