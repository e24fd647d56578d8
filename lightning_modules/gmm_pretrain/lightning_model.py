"""Pre-training by regression of GMM pseudo-defect parameters (paper 003), L_direct or L_indirect."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.figures import save_figure
from lightning_modules.base import ShiftADModule
from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.components.gmm_defects import GMMParams, direct_loss, indirect_loss, render_defects
from lightning_modules.components.metrics import ScoreCollector
from lightning_modules.gmm_pretrain.torch_model import GMMRegressor

BACKBONE_FILE = "backbone.pth"
FIGURE_NAME = "gmm_reconstructions"


class GMMPretrain(ShiftADModule):
    """Regresses θ_GMM from pseudo-defect images; the backbone is then used by PaDiM.

    Batches are ``{"normal", "theta"}`` from ``GMMPretrainDataModule``; the pseudo-defect
    I_ano = f_ano(I_norm, θ) is rendered here, on the device. Validation logs both losses
    (``val/direct``, ``val/indirect``) and writes a Figure-5-like grid (normal, pseudo-defect,
    re-rendering from θ̂). ``test`` reports both losses on the held-out test pairs, averaged over
    distinct pairs (``test/direct``, ``test/indirect``), the same on any number of processes. At the end of fit the backbone (without the head) is written to
    ``<run folder>/backbone.pth`` with its architecture and normalisation as metadata, for
    ``backbone: {name: ..., weights: <that file>}``.

    Args:
        backbone: the network to pre-train and where its initial weights come from.
        num_gaussians: K (must match the DataModule's).
        num_channels: C (must match the DataModule's).
        loss: ``direct`` (eq 9, nearest-neighbour parameter matching) or ``indirect`` (eq 11, re-render + MSE).
        figure_rows: pairs shown in the reconstruction figure.
    """

    method_name = "gmm_pretrain"

    def __init__(self, backbone: BackboneSpec | None = None, num_gaussians: int = 30, num_channels: int = 3,
                 loss: Literal["direct", "indirect"] = "direct", figure_rows: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        if loss not in ("direct", "indirect"):
            raise ValueError(f"loss must be 'direct' or 'indirect', got {loss!r}")
        self.save_hyperparameters()
        self.loss = loss
        self.figure_rows = figure_rows
        self.model = GMMRegressor(backbone or BackboneSpec(), num_gaussians, num_channels)
        self._figure_batch: dict[str, torch.Tensor] | None = None
        self.test_losses = torch.nn.ModuleDict({"direct": ScoreCollector(), "indirect": ScoreCollector()})

    def pseudo_defects(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, GMMParams]:
        """(I_norm, I_ano = f_ano(I_norm, θ), θ) of a batch, rendered on the batch's device."""
        theta = batch["theta"]
        model = self.model
        try:
            target = GMMParams.unflatten(theta, model.num_gaussians, model.num_channels)
        except ValueError as err:
            raise ValueError(f"the data's θ_GMM (width {theta.shape[-1]}) does not fit the model's "
                             f"num_gaussians={model.num_gaussians}, num_channels={model.num_channels}: set the same "
                             f"K and C in model and data ({err})") from err
        with torch.no_grad():
            anomalous, _ = render_defects(batch["normal"], target)
        return batch["normal"], anomalous, target

    def both_losses(self, normal: torch.Tensor, anomalous: torch.Tensor, target: GMMParams,
                    predicted: GMMParams) -> dict[str, torch.Tensor]:
        """L_direct and L_indirect of one batch (validation reports both, whichever one trains)."""
        return {"direct": direct_loss(target, predicted), "indirect": indirect_loss(normal, anomalous, predicted)}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        normal, anomalous, target = self.pseudo_defects(batch)
        predicted = self.model(anomalous)
        if self.loss == "direct":
            term = direct_loss(target, predicted)
        else:
            term = indirect_loss(normal, anomalous, predicted)
        return self.checked_total({self.loss: term})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        normal, anomalous, target = self.pseudo_defects(batch)
        predicted = self.model(anomalous)
        losses = self.both_losses(normal, anomalous, target, predicted)
        size = normal.shape[0]
        self.log_dict({f"val/{name}": value for name, value in losses.items()}, sync_dist=True, batch_size=size)
        self.log("val/loss", losses[self.loss], sync_dist=True, batch_size=size)
        if batch_idx == 0:
            rows = slice(0, self.figure_rows)
            rerendered, _ = render_defects(normal[rows], GMMParams(*(t[rows] for t in vars(predicted).values())))
            self._figure_batch = {"normal": normal[rows], "pseudo-defect": anomalous[rows],
                                  "re-rendered from θ̂": rerendered}

    def on_test_epoch_start(self) -> None:
        for collector in self.test_losses.values():
            collector.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        normal, anomalous, target = self.pseudo_defects(batch)
        predicted = self.model(anomalous)
        losses = {"direct": direct_loss(target, predicted, reduction="none"),
                  "indirect": indirect_loss(normal, anomalous, predicted, reduction="none")}
        for name, per_pair in losses.items():
            self.test_losses[name].update(per_pair, torch.zeros_like(per_pair), batch["index"])

    def on_test_epoch_end(self) -> None:
        for name, collector in self.test_losses.items():
            per_pair, _ = collector.compute()
            self.log(f"test/{name}", per_pair.double().mean().float())

    def on_validation_epoch_end(self) -> None:
        if self._figure_batch is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        columns = self._figure_batch
        rows = next(iter(columns.values())).shape[0]
        figure, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows), squeeze=False)
        for col, (title, images) in enumerate(columns.items()):
            for row in range(rows):
                axes[row, col].imshow(images[row].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
                axes[row, col].set_axis_off()
            axes[0, col].set_title(title, fontsize=9)
        figure.suptitle(f"L_{self.loss}, step {self.global_step}", fontsize=9)
        figure.tight_layout()
        save_figure(self.trainer, figure, FIGURE_NAME)
        self._figure_batch = None

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / BACKBONE_FILE
            self.model.save_backbone(path, f"GMM pre-training, L_{self.loss}, of {self.model.weights_source}")
            rank_zero_info(f"pre-trained backbone written to {path} (use it as backbone.weights)")
