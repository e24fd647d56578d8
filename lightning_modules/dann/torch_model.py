"""Domain-adaptive normal/defect classifier (paper 000): encoder G_f, label head G_y, domain discriminator G_d.

Encoder = backbone stage → global average pool → bottleneck (Linear → BN → ReLU). The head gives one
defect logit. DANN puts a gradient-reversal layer between the encoder and the discriminator; ADDA keeps
the source encoder and trains a separate target encoder M_t against the discriminator.

BatchNorm policy of the encoder:

- ``joint``: source and target go through in one batch, so the statistics are shared (tllib's recipe);
- ``per_domain``: each domain has its own batch statistics and its own running statistics (the target's
  are swapped in while target images are encoded);
- ``frozen``: every BatchNorm of the encoder stays in eval mode with its loaded statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor
from lightning_modules.components.discriminator import DomainDiscriminator
from lightning_modules.components.gradient_reversal import reverse_gradient

BN_POLICIES = ("joint", "per_domain", "frozen")
POOLINGS = ("avg", "max")
DOMAINS = ("source", "target")


class Encoder(nn.Module):
    """G_f: images [B, 3, H, W] in [0, 1] -> features [B, bottleneck_dim].

    ``pooling``: ``avg`` (global average, as in ResNet) or ``max`` (global max: a small local defect is not
    averaged away over the whole image).
    """

    def __init__(self, backbone: BackboneSpec, layer: str | int, trainable: list[str], bottleneck_dim: int,
                 pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
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


class TargetBatchNormStatistics(nn.Module):
    """A second set of running statistics (the target domain's) for every BatchNorm of a module.

    Buffers are stored by position, so the set survives SyncBatchNorm conversion (same modules, same order)
    and is saved in checkpoints. All ranks swap at the same points, so DDP's buffer broadcast stays consistent.
    """

    def __init__(self, layers: list[_BatchNorm]) -> None:
        super().__init__()
        for index, layer in enumerate(layers):
            self.register_buffer(f"mean_{index}", layer.running_mean.detach().clone())
            self.register_buffer(f"var_{index}", layer.running_var.detach().clone())
            self.register_buffer(f"count_{index}", layer.num_batches_tracked.detach().clone())
        self.size = len(layers)

    def swap(self, layers: list[_BatchNorm]) -> None:
        """Exchanges these statistics with the layers' live ones.

        The tensor objects change places (nothing is written in place), so tensors that autograd saved in an
        earlier forward pass are left as they were.
        """
        if len(layers) != self.size:
            raise RuntimeError(f"expected {self.size} BatchNorm layers, found {len(layers)}")
        for index, layer in enumerate(layers):
            for live, kept in (("running_mean", f"mean_{index}"), ("running_var", f"var_{index}"),
                               ("num_batches_tracked", f"count_{index}")):
                layer._buffers[live], self._buffers[kept] = self._buffers[kept], layer._buffers[live]


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


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
        with_target_encoder: build ADDA's target encoder M_t (a copy of the encoder, made later).
    """

    def __init__(self, backbone: BackboneSpec, layer: str | int = -1, trainable: list[str] | None = None,
                 bottleneck_dim: int = 256, pooling: str = "avg", bn_policy: str = "joint",
                 discriminator_hidden: int = 1024, with_target_encoder: bool = False) -> None:
        super().__init__()
        if bn_policy not in BN_POLICIES:
            raise ValueError(f"bn_policy must be one of {BN_POLICIES}, got {bn_policy!r}")
        if bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim must be >= 1, got {bottleneck_dim}")
        self.bn_policy = bn_policy
        trainable = ["*"] if trainable is None else trainable
        self.encoder = Encoder(backbone, layer, trainable, bottleneck_dim, pooling)
        self.head = nn.Linear(bottleneck_dim, 1)  # G_y: one defect logit
        self.discriminator = DomainDiscriminator(bottleneck_dim, discriminator_hidden) if discriminator_hidden else None
        self.target_statistics = TargetBatchNormStatistics(batch_norms(self.encoder))
        self.use_target_statistics = bn_policy == "per_domain"
        # ADDA: M_t, initialised from the trained source encoder when adversarial training begins.
        self.target_encoder = copy.deepcopy(self.encoder) if with_target_encoder else None
        self.register_buffer("target_encoder_ready", torch.tensor(False))
        self.source_frozen = False

    # ------------------------------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> DomainAdaptiveClassifier:
        super().train(mode)
        if self.bn_policy == "frozen":
            for layer in batch_norms(self.encoder):
                layer.eval()
        if self.source_frozen:
            self.encoder.eval()
            self.head.eval()
        return self

    def freeze_source(self) -> None:
        """ADDA: the source encoder and the head keep their weights and statistics from now on."""
        for module in (self.encoder, self.head):
            module.requires_grad_(False)
            module.eval()
        self.source_frozen = True

    @torch.no_grad()
    def init_target_encoder(self) -> None:
        """ADDA: M_t starts as a copy of the trained source encoder."""
        if self.target_encoder is None:
            raise RuntimeError("this model was built without a target encoder (with_target_encoder=False)")
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_encoder_ready.fill_(True)

    @contextmanager
    def target_domain_statistics(self) -> Iterator[None]:
        """Inside, the encoder's BatchNorms use (and, in train mode, update) the target's running statistics."""
        layers = batch_norms(self.encoder)
        self.target_statistics.swap(layers)
        try:
            yield
        finally:
            self.target_statistics.swap(layers)

    @torch.no_grad()
    def estimate_target_statistics(self, target_images: Iterable[torch.Tensor]) -> None:
        """AdaBN: the target's running statistics become the exact mean/variance over ``target_images``.

        Only the BatchNorms whose statistics were learned on the source (the trainable ones) are re-estimated.
        A frozen backbone stage kept its pretrained (ImageNet) statistics for the source too; replacing them
        with target statistics would feed the head features of a kind it never saw.
        """
        layers = [layer for layer in batch_norms(self.encoder) if any(p.requires_grad for p in layer.parameters())]
        was_training = self.training
        self.eval()
        with self.target_domain_statistics():
            momenta = [layer.momentum for layer in layers]
            for layer in layers:
                layer.reset_running_stats()
                layer.momentum = None  # cumulative average over all batches
                layer.train()
            for images in target_images:
                self.encoder(images)
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum
        self.use_target_statistics = True
        self.train(was_training)

    # ------------------------------------------------------------------------------------------ forward

    def features(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        """Encoder features of images from one domain, with that domain's encoder and statistics."""
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        if domain == "target" and self.target_encoder is not None and bool(self.target_encoder_ready):
            return self.target_encoder(images)
        if domain == "target" and self.use_target_statistics:
            with self.target_domain_statistics():
                return self.encoder(images)
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
