"""A light bi-directional feature pyramid (BiFPN-style, EfficientDet) over backbone stages.

One top-down and one bottom-up pass; every fusion is a learned, non-negative, normalised weighted sum
of its inputs ("fast normalised fusion") followed by a depthwise-separable 3x3 convolution. GroupNorm
(per sample) instead of BatchNorm, so query and reference images never share normalisation statistics
and the target domain at test time is normalised the same way as the source domains in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1, GroupNorm, SiLU."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            _norm(channels),
            nn.SiLU(),
        )


class WeightedFusion(nn.Module):
    """sum_i w_i x_i / (sum_i w_i + eps) with w_i = relu(learned), then a separable conv."""

    def __init__(self, num_inputs: int, channels: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps
        self.conv = SeparableConv(channels)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        weights = F.relu(self.weights)
        weights = weights / (weights.sum() + self.eps)
        return self.conv(sum(w * x for w, x in zip(weights, inputs, strict=True)))


class BiFeaturePyramid(nn.Module):
    """Fuses L feature maps (finest first, each stride twice the previous) into L maps of ``channels``.

    Args:
        in_channels: channels of the input maps, finest first.
        channels: channels of every output level.
        num_passes: repeated top-down + bottom-up passes (EfficientDet's BiFPN depth).
    """

    def __init__(self, in_channels: list[int], channels: int = 64, num_passes: int = 1) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"a feature pyramid needs at least two input levels, got in_channels={in_channels}")
        if channels < 1 or num_passes < 1:
            raise ValueError(f"need channels >= 1 and num_passes >= 1, got {channels}, {num_passes}")
        self.num_levels = len(in_channels)
        self.channels = channels
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, channels, 1), _norm(channels)) for c in in_channels)
        levels = self.num_levels
        # Per pass: top-down fusions for levels L-2..0 (2 inputs), bottom-up for 1..L-1 (3 inputs; 2 at the top).
        self.top_down = nn.ModuleList(
            nn.ModuleList(WeightedFusion(2, channels) for _ in range(levels - 1)) for _ in range(num_passes))
        self.bottom_up = nn.ModuleList(
            nn.ModuleList(WeightedFusion(3 if i < levels - 1 else 2, channels) for i in range(1, levels))
            for _ in range(num_passes))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature maps, got {len(features)}")
        levels = [lateral(x) for lateral, x in zip(self.lateral, features, strict=True)]
        for top_down, bottom_up in zip(self.top_down, self.bottom_up, strict=True):
            # Top-down: each level takes the upsampled, already fused coarser level.
            fused = [None] * self.num_levels
            fused[-1] = levels[-1]
            for i in range(self.num_levels - 2, -1, -1):
                coarser = F.interpolate(fused[i + 1], size=levels[i].shape[-2:], mode="nearest")
                fused[i] = top_down[i]([levels[i], coarser])
            # Bottom-up: each level takes its input, its top-down result and the downsampled finer output.
            out = [fused[0]]
            for i in range(1, self.num_levels):
                finer = F.adaptive_max_pool2d(out[i - 1], levels[i].shape[-2:])
                inputs = [levels[i], fused[i], finer] if i < self.num_levels - 1 else [levels[i], finer]
                out.append(bottom_up[i - 1](inputs))
            levels = out
        return levels
