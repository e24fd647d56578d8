"""Image encoder of the domain-adaptive classifiers (DANN, ADDA): backbone stage → global pooling → bottleneck."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor

POOLINGS = ("avg", "max")


class PooledEncoder(nn.Module):
    """G_f: images [B, 3, H, W] in [0, 1] -> features [B, bottleneck_dim].

    ``pooling``: ``avg`` (global average, as in ResNet) or ``max`` (global max: a small local defect is not
    averaged away over the whole image).
    """

    def __init__(self, backbone: BackboneSpec, layer: str | int, trainable: list[str], bottleneck_dim: int,
                 pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim must be >= 1, got {bottleneck_dim}")
        self.pooling = pooling
        self.extractor = FeatureExtractor(backbone, [layer], trainable)
        self.layer = self.extractor.layers[0]
        self.bottleneck = nn.Sequential(
            nn.Linear(self.extractor.out_channels[0], bottleneck_dim), nn.BatchNorm1d(bottleneck_dim), nn.ReLU()
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feature_map = self.extractor(images)[self.layer]
        pooled = feature_map.mean(dim=(2, 3)) if self.pooling == "avg" else feature_map.amax(dim=(2, 3))
        return self.bottleneck(pooled)

