"""CS-Flow as a plain torch model: a 3-scale feature extractor and a cross-scale normalizing flow.

Paper 001 (few-shot adaptation of CS-Flow to a domain shift) and Rudolph et al. (CS-Flow):
y_s = f_FE(x at scale s) for s in (1, 1/2, 1/4); (z, log|det J|) = f_NF(y);
NLL = (0.5·Σz² − log|det J|) / D per sample; image score = mean z²/2; map = channel-mean z² (largest scale).
The scores may read z standardised per scale and channel, (z − μ)/σ, or the extractor may normalise each scale
with statistics of its own (ShiftAD's target recalibration).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor
from lightning_modules.components.batchnorm_statistics import BatchNormStatistics
from lightning_modules.components.cross_scale_flow import CrossScaleFlow

SCALES = (1.0, 0.5, 0.25)
BNPolicy = Literal["batch", "frozen"]


def mbconv_block_names(extractor: FeatureExtractor) -> list[str]:
    """The extractor's MBConv blocks in forward order (``blocks.<stage>.<index>``)."""
    names = [name for name, _ in extractor.body.named_modules() if name.count(".") == 2 and name.startswith("blocks.")]
    return sorted(names, key=lambda name: tuple(int(part) for part in name.split(".")[1:]))


def rescaled(images: torch.Tensor, scale: float) -> torch.Tensor:
    """images at ``scale`` of their side (antialiased bilinear), as the extractor sees that scale."""
    return images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                   align_corners=False, antialias=True)


class CSFlowModel(nn.Module):
    """Feature extractor at 3 scales + cross-scale flow.

    Args:
        backbone: the EfficientNet (paper: ``efficientnet_b5``; offline default: packaged ``efficientnet_lite0``).
        layer: the block whose output is the feature map (paper: ``blocks.5.<last>`` of B5, 304 channels;
            Lite0's analogue: ``blocks.5.3``, 192 channels).
        image_size: side of the (square) input images; the flow's shapes are built for it.
        hidden_channels: subnetwork width (1024 in the paper).
        kernel_sizes: one flow block per kernel size (paper: 3, 3, 3, 5).
        clamp: soft-clamp bound of the coupling log-scales (3).
    """

    def __init__(self, backbone: BackboneSpec, layer: str = "blocks.5.3", image_size: int = 768,
                 hidden_channels: int = 1024, kernel_sizes: Sequence[int] = (3, 3, 3, 5), clamp: float = 3.0) -> None:
        super().__init__()
        self.layer = layer
        self.image_size = image_size
        self.extractor = FeatureExtractor(backbone, [layer])
        shapes = [tuple(f.shape[1:]) for f in self._probe_shapes(image_size)]
        if min(min(shape[1:]) for shape in shapes) < 1:
            raise ValueError(f"image_size={image_size} is too small for layer {layer!r}: feature shapes {shapes}")
        self.flow = CrossScaleFlow(shapes, hidden_channels, kernel_sizes, clamp)
        # Not in the state dict: a standardisation or a scale's statistics are fitted from a run's target shots.
        for scale in range(len(SCALES)):
            self.register_buffer(f"z_mean_{scale}", None, persistent=False)
            self.register_buffer(f"z_std_{scale}", None, persistent=False)
        self.scale_statistics = nn.ModuleList(BatchNormStatistics(self.extractor, persistent=False) for _ in SCALES)
        self.use_scale_statistics = False

    def _probe_shapes(self, image_size: int) -> list[torch.Tensor]:
        was_training = self.extractor.training
        with torch.no_grad():
            features = self.features(torch.zeros(1, 3, image_size, image_size), self.extractor.eval())
        self.extractor.train(was_training)
        return features

    def features(self, images: torch.Tensor, extractor: FeatureExtractor | None = None) -> list[torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> y per scale, largest first; each scale through the extractor with its
        own BatchNorm statistics when they are in use."""
        if extractor is None and self.use_scale_statistics:
            return [functional_call(self.extractor, statistics.as_buffers(), (rescaled(images, scale),))[self.layer]
                    for scale, statistics in zip(SCALES, self.scale_statistics, strict=True)]
        extractor = extractor or self.extractor
        return [extractor(rescaled(images, scale))[self.layer] for scale in SCALES]

    def nll(self, z: Sequence[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
        """Per-sample negative log-likelihood per dimension, (0.5·Σz² − log|det J|) / D -> [B]."""
        squared = sum(t.pow(2).flatten(1).sum(1) for t in z)
        return (0.5 * squared - log_det) / self.flow.dims

    def set_output_standardisation(self, mean: Sequence[torch.Tensor] | None, std: Sequence[torch.Tensor] | None
                                   ) -> None:
        """The scores read (z − mean)/std per scale (each [C]); None: z as the flow gives it."""
        for scale in range(len(SCALES)):
            setattr(self, f"z_mean_{scale}", None if mean is None else mean[scale].detach().clone())
            setattr(self, f"z_std_{scale}", None if std is None else std[scale].detach().clone())

    def standardised(self, z: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.z_mean_0 is None:
            return list(z)
        return [(t - getattr(self, f"z_mean_{scale}")[:, None, None]) / getattr(self, f"z_std_{scale}")[:, None, None]
                for scale, t in enumerate(z)]

    def anomaly_scores(self, z: Sequence[torch.Tensor], image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image score = mean of z²/2 over every scale [B], map = channel-mean z² of scale 1 upsampled [B, H, W]),
        of z standardised when a standardisation is set."""
        z = self.standardised(z)
        scores = 0.5 * torch.cat([t.pow(2).flatten(1) for t in z], dim=1).mean(1)
        maps = z[0].pow(2).mean(1, keepdim=True)
        maps = F.interpolate(maps, size=image_size, mode="bilinear", align_corners=False)[:, 0]
        return scores, maps

    def set_adaptable(self, blocks: int, include_stem: bool = False, include_flow: bool = False) -> list[str]:
        """Freeze everything but the extractor's first ``blocks`` MBConv blocks (and the stem if asked) and, if
        asked, the flow; returns the trainable modules' names in this model."""
        names = mbconv_block_names(self.extractor)
        if not 0 <= blocks <= len(names) or not (blocks or include_stem or include_flow):
            raise ValueError(f"adapt_blocks must be in [1, {len(names)}] for this backbone (0 only with adapt_flow "
                             f"or adapt_stem), got {blocks}")
        trainable = (["conv_stem", "bn1"] if include_stem else []) + names[:blocks]
        self.extractor.set_trainable(trainable)
        self.flow.requires_grad_(include_flow)
        return [f"extractor.body.{name}" for name in trainable] + (["flow"] if include_flow else [])

    def freeze_adapted_batchnorm(self) -> None:
        """BN policy ``frozen``: the adapted blocks keep the source running statistics (eval mode)."""
        for module in self.extractor.body.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
