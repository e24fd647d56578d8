"""Domain-adaptive normal/defect classifier (paper 000): encoder G_f, label head G_y, domain discriminator G_d.

Encoder = backbone stage → global pooling → bottleneck (Linear → BN → ReLU) (``PooledEncoder``). The head
gives one defect logit. DANN puts a gradient-reversal layer between the encoder and the discriminator.

BatchNorm policy of the encoder:

- ``joint``: source and target go through in one batch, so the statistics are shared (tllib's recipe);
- ``per_domain``: each domain has its own batch statistics and its own running statistics (the target's are
  kept in a ``BatchNormStatistics`` and handed to the encoder with ``torch.func.functional_call``);
- ``frozen``: every BatchNorm of the encoder stays in eval mode with its loaded statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call

from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.components.batchnorm_statistics import (
    BatchNormStatistics,
    ChannelMoments,
    batch_norms,
    forward_order,
    layer_input,
    trained_batch_norms,
)
from lightning_modules.components.discriminator import DomainDiscriminator
from lightning_modules.components.gradient_reversal import reverse_gradient
from lightning_modules.components.pooled_encoder import PooledEncoder

BN_POLICIES = ("joint", "per_domain", "frozen")
DOMAINS = ("source", "target")


class DomainAdaptiveClassifier(nn.Module):
    """Normal/defect classifier with the parts domain adaptation needs.

    Args:
        backbone: which backbone and weights (ResNet-18 in paper 000).
        layer: backbone module (or feature-stage index) whose output is pooled; -1 = the last stage.
        trainable: backbone module-name prefixes that are fine-tuned (``["*"]`` = all).
        bottleneck_dim: width of the bottleneck features the head and the discriminator see.
        pooling: ``avg`` or ``max`` global pooling of the backbone map.
        bn_policy: ``joint``, ``per_domain`` or ``frozen`` (see the module docstring).
        discriminator_hidden: hidden width of the domain discriminator; 0 builds none.
    """

    def __init__(self, backbone: BackboneSpec, layer: str | int = -1, trainable: list[str] | None = None,
                 bottleneck_dim: int = 256, pooling: str = "avg", bn_policy: str = "joint",
                 discriminator_hidden: int = 1024) -> None:
        super().__init__()
        if bn_policy not in BN_POLICIES:
            raise ValueError(f"bn_policy must be one of {BN_POLICIES}, got {bn_policy!r}")
        self.bn_policy = bn_policy
        trainable = ["*"] if trainable is None else trainable
        self.encoder = PooledEncoder(backbone, layer, trainable, bottleneck_dim, pooling)
        self.head = nn.Linear(bottleneck_dim, 1)  # G_y: one defect logit
        self.discriminator = DomainDiscriminator(bottleneck_dim, discriminator_hidden) if discriminator_hidden else None
        self.target_statistics = BatchNormStatistics(self.encoder)
        self.use_target_statistics = bn_policy == "per_domain"

    def train(self, mode: bool = True) -> DomainAdaptiveClassifier:
        super().train(mode)
        if self.bn_policy == "frozen":
            for layer in batch_norms(self.encoder):
                layer.eval()
        return self

    def encode_with_target_statistics(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder with the target's running statistics (used, and in train mode updated)."""
        return functional_call(self.encoder, self.target_statistics.as_buffers(), (images,))

    @torch.no_grad()
    def estimate_target_statistics(self, target_batches: Iterable[torch.Tensor]) -> None:
        """AdaBN: each re-estimated BatchNorm's target mean and (unbiased) variance become those of its input
        over all target images, with the earlier layers already normalising with their new target statistics
        (``components.batchnorm_statistics``: layer after layer, only the BatchNorms trained on the source)."""
        batches = list(target_batches)
        if not batches:
            raise ValueError("AdaBN needs target images to estimate statistics from; got none")
        was_training = self.training
        self.eval()
        forward = self.encode_with_target_statistics
        for name, layer in forward_order(forward, batches[0], trained_batch_norms(self.encoder)):
            moments = ChannelMoments()
            for images in batches:
                moments.add(layer_input(forward, layer, images))
            self.target_statistics.store(name, *moments.result())
        self.use_target_statistics = True
        self.train(was_training)

    def features(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        """Encoder features of images from one domain, with that domain's statistics."""
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        if domain == "target" and self.use_target_statistics:
            return self.encode_with_target_statistics(images)
        return self.encoder(images)

    def paired_features(self, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a source and a target batch under the BatchNorm policy (one joint pass unless per-domain)."""
        if self.bn_policy == "per_domain":
            return self.features(source, "source"), self.features(target, "target")
        joint = self.encoder(torch.cat([source, target]))
        return joint[: source.shape[0]], joint[source.shape[0]:]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Defect logits [B] from encoder features."""
        return self.head(features).squeeze(1)

    def discriminate(self, features: torch.Tensor, reversal: float | None = None) -> torch.Tensor:
        """Domain logits [B] (positive = source); with ``reversal`` = λ the gradient into ``features`` is ×(−λ)."""
        if self.discriminator is None:
            raise RuntimeError("this model was built without a domain discriminator (discriminator_hidden=0)")
        if reversal is not None:
            features = reverse_gradient(features, reversal)
        return self.discriminator(features)

    def forward(self, images: torch.Tensor, domain: str = "target") -> torch.Tensor:
        """Defect logits [B] of images from ``domain``."""
        return self.classify(self.features(images, domain))
