"""The regression CNN of paper 003 (section 3.2): image -> θ̂_GMM, K(C+6)+1 outputs with the paper's activations."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models import split_model_name_tag
from torch import nn

from lightning_modules.components.backbone import BackboneSpec, build_backbone, save_backbone_weights
from lightning_modules.components.gmm_defects import GMMParams, num_outputs


class GMMRegressor(nn.Module):
    """f_CNN (eq 8): a shared-builder backbone whose classifier is replaced by a K(C+6)+1-output head.

    Args:
        backbone: the network to pre-train (paper: WideResNet-50).
        num_gaussians: K.
        num_channels: C.
    """

    def __init__(self, backbone: BackboneSpec, num_gaussians: int = 30, num_channels: int = 3) -> None:
        super().__init__()
        self.num_gaussians = num_gaussians
        self.num_channels = num_channels
        self.arch = split_model_name_tag(backbone.name)[0]
        self.network, self.normalizer, self.weights_source = build_backbone(backbone)
        self.network.reset_classifier(num_outputs(num_gaussians, num_channels))
        self.head_prefix = self.network.pretrained_cfg["classifier"] + "."

    def forward(self, images: torch.Tensor) -> GMMParams:
        """images [B, 3, H, W] in [0, 1] -> θ̂_GMM."""
        logits = self.network(self.normalizer(images))
        return GMMParams.from_logits(logits.float(), self.num_gaussians, self.num_channels)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The timm state dict without the regression head."""
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()
                if not k.startswith(self.head_prefix)}

    def save_backbone(self, path: str | Path, source: str) -> None:
        """Writes the headless backbone with its architecture and the normalisation it was trained with, for
        ``BackboneSpec(weights=path)``."""
        save_backbone_weights(path, self.backbone_state_dict(), self.arch, self.normalizer, source)
