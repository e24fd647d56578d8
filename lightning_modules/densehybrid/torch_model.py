"""DenseHybridAD's network: a segmentation model with two heads on the same decoder features.

- logits head (BN→ReLU→1×1 conv): segmentation logits s_k(x); ln p̂(x) = logsumexp_k s_k(x) is read as
  an unnormalised log-density of the data;
- outlier head (BN→ReLU→1×1 conv): one logit of P(d_out|x).

Anomaly score per pixel: s(x) = ln P(d_out|x) − ln p̂(x).

Two builds:

- ``deeplabv3_resnet50`` (paper 004): torchvision's DeepLabV3-ResNet-50 with segmentation weights from
  a local file; the decoder is its ASPP and 3×3 conv, the logits head its last BN-ReLU-Conv.
- ``light`` (offline default): the shared timm feature extractor (packaged ImageNet EfficientNet-Lite0)
  and a small upsample-and-add decoder to stride 8. Its decoder has no segmentation pre-training.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50

from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor, ImageNormalizer
from lightning_modules.components.torch_files import load_torch_file

Build = Literal["light", "deeplabv3_resnet50"]
FreezePolicy = Literal["all", "backbone", "none"]
AnomalyScore = Literal["hybrid", "outlier_head", "energy"]
BUILDS: tuple[str, ...] = get_args(Build)
FREEZE_POLICIES: tuple[str, ...] = get_args(FreezePolicy)
ANOMALY_SCORES: tuple[str, ...] = get_args(AnomalyScore)
RANDOM_WEIGHTS = "random"
PASCAL_VOC_CLASSES = 21
LIGHT_LAYERS = ["blocks.2", "blocks.4", "blocks.6"]  # strides 8, 16, 32 of EfficientNet-Lite0


class BnReluConv(nn.Sequential):
    """The heads' last BN-ReLU-Conv (1×1)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(OrderedDict(bn=nn.BatchNorm2d(in_channels), relu=nn.ReLU(),
                                     conv=nn.Conv2d(in_channels, out_channels, 1)))


class LightEncoder(nn.Module):
    """The shared timm feature extractor, returning its stages as a list (finest first)."""

    def __init__(self, spec: BackboneSpec, layers: list[str]) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(spec, layers, trainable=["*"])
        self.out_channels = self.extractor.out_channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.extractor(images).values())


class UpsampleAddDecoder(nn.Module):
    """1×1 lateral projections, coarse-to-fine upsample-and-add, then a 3×3 conv (before the heads' BN)."""

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.out_channels = channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](features[-1])
        for lateral, finer in zip(reversed(self.lateral[:-1]), reversed(features[:-1]), strict=True):
            x = F.interpolate(x, size=finer.shape[-2:], mode="bilinear", align_corners=False) + lateral(finer)
        return self.fuse(x)


class ResNetEncoder(nn.Module):
    """DeepLabV3's dilated ResNet-50 (stride 8), normalising [0, 1] images with ImageNet mean/std."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.normalizer = ImageNormalizer(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.body(self.normalizer(images))["out"]]


class AsppDecoder(nn.Module):
    """DeepLabV3's ASPP and 3×3 conv (the classifier up to its last BN-ReLU-Conv)."""

    def __init__(self, aspp: nn.Module, conv: nn.Module) -> None:
        super().__init__()
        self.aspp = aspp
        self.conv = conv
        self.out_channels = conv.out_channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.aspp(features[-1]))


def load_deeplabv3_resnet50(weights: str | None) -> nn.Module:
    """torchvision's DeepLabV3-ResNet-50 (21 classes) with weights from a local file; never downloads."""
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=PASCAL_VOC_CLASSES, aux_loss=False)
    if weights == RANDOM_WEIGHTS:
        return model
    if weights is None:
        raise FileNotFoundError(
            "build=deeplabv3_resnet50 needs segmentation weights: set deeplab_weights to a local torchvision "
            "state-dict file (e.g. deeplabv3_resnet50_coco-cd0a2569.pth, trained on the Pascal VOC classes), "
            f"or deeplab_weights={RANDOM_WEIGHTS} for an untrained network. Nothing is downloaded; offline, "
            "use build=light."
        )
    state = load_torch_file(weights, "deeplab_weights", "a torchvision DeepLabV3-ResNet-50 state dict")
    state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"deeplab_weights={weights!r} is not a DeepLabV3-ResNet-50 state dict: {err}") from err
    return model


class DenseHybridModel(nn.Module):
    """Segmentation logits and an outlier logit per pixel, at the input resolution.

    Args:
        build: ``light`` (offline default) or ``deeplabv3_resnet50`` (paper 004).
        num_classes: channels of the logits head. With ``deeplabv3_resnet50`` and 21 classes the
            pre-trained Pascal VOC classifier is kept; another count replaces its last 1×1 conv.
        freeze: ``all`` (all but the last BN-ReLU-Conv of both heads), ``backbone`` or ``none``.
        backbone: the light build's feature extractor.
        decoder_channels: width of the light build's decoder.
        deeplab_weights: the DeepLabV3-ResNet-50 state-dict file (``random``: untrained).
    """

    def __init__(self, build: Build = "light", num_classes: int = PASCAL_VOC_CLASSES, freeze: FreezePolicy = "all",
                 backbone: BackboneSpec | None = None, decoder_channels: int = 128,
                 deeplab_weights: str | None = None) -> None:
        super().__init__()
        if build not in BUILDS:
            raise ValueError(f"build must be one of {', '.join(BUILDS)}, got {build!r}")
        if freeze not in FREEZE_POLICIES:
            raise ValueError(f"freeze must be one of {', '.join(FREEZE_POLICIES)}, got {freeze!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if build == "light":
            self.encoder = LightEncoder(backbone or BackboneSpec(), LIGHT_LAYERS)
            self.decoder = UpsampleAddDecoder(self.encoder.out_channels, decoder_channels)
            self.logits_head = BnReluConv(decoder_channels, num_classes)
        else:
            deeplab = load_deeplabv3_resnet50(deeplab_weights)
            self.encoder = ResNetEncoder(deeplab.backbone)
            self.decoder = AsppDecoder(deeplab.classifier[0], deeplab.classifier[1])
            self.logits_head = BnReluConv(self.decoder.out_channels, PASCAL_VOC_CLASSES)
            self.logits_head.load_state_dict({f"{name}.{key}": value for name, index in (("bn", 2), ("conv", 4))
                                              for key, value in deeplab.classifier[index].state_dict().items()})
            if num_classes != PASCAL_VOC_CLASSES:
                self.logits_head.conv = nn.Conv2d(self.decoder.out_channels, num_classes, 1)
        self.outlier_head = BnReluConv(self.decoder.out_channels, 1)
        self.freeze = freeze
        self._apply_freeze()

    def trainable_modules(self) -> list[nn.Module]:
        """What the freeze policy leaves trainable."""
        heads = [self.logits_head.bn, self.logits_head.conv, self.outlier_head]
        return {"all": heads, "backbone": [self.decoder, *heads], "none": [self]}[self.freeze]

    def _apply_freeze(self) -> None:
        self.requires_grad_(False)
        for module in self.trainable_modules():
            module.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> DenseHybridModel:
        """Frozen parts stay in eval mode: BatchNorm statistics stay as loaded and dropout is off."""
        super().train(mode)
        for module in self.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> (logits [B, K, H, W], outlier logits [B, H, W])."""
        features = self.decoder(self.encoder(images))
        size = images.shape[-2:]
        logits = F.interpolate(self.logits_head(features), size=size, mode="bilinear", align_corners=False)
        outlier = F.interpolate(self.outlier_head(features), size=size, mode="bilinear", align_corners=False)
        return logits, outlier[:, 0]

    @staticmethod
    def log_density(logits: torch.Tensor) -> torch.Tensor:
        """ln p̂(x) = logsumexp_k s_k(x), in float32."""
        return torch.logsumexp(logits.float(), dim=1)

    def anomaly_map(self, images: torch.Tensor, score: AnomalyScore = "hybrid") -> torch.Tensor:
        """Per-pixel anomaly score [B, H, W], higher is more anomalous: ``hybrid`` s(x) = ln P(d_out|x) − ln p̂(x);
        ``outlier_head`` ln P(d_out|x) or ``energy`` −ln p̂(x) alone (for ablations)."""
        logits, outlier = self(images)
        if score == "outlier_head":
            return F.logsigmoid(outlier.float())
        if score == "energy":
            return -self.log_density(logits)
        return F.logsigmoid(outlier.float()) - self.log_density(logits)
