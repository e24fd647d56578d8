"""ADDA (Tzeng et al., adversarial discriminative domain adaptation) for the normal/defect classifier of paper 000.

Source encoder M_s and head C are trained on the labelled source; then a target encoder M_t, initialised from
M_s, is trained so that the discriminator D cannot tell M_t(x_t) from M_s(x_s), while M_s and C stay frozen.
Target images are classified as C(M_t(x_t)). Each encoder sees one domain, so its BatchNorm statistics are
that domain's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.components.discriminator import DomainDiscriminator
from lightning_modules.components.pooled_encoder import PooledEncoder

DOMAINS = ("source", "target")


class AdversarialAdaptationClassifier(nn.Module):
    """M_s, C, M_t and D.

    Args:
        backbone: which backbone and weights.
        layer: backbone module (or feature-stage index) whose output is pooled; -1 = the last stage.
        trainable: backbone module-name prefixes that are fine-tuned (``["*"]`` = all).
        bottleneck_dim: width of the features the head and the discriminator see.
        pooling: ``avg`` or ``max`` global pooling of the backbone map.
        discriminator_hidden: hidden width of the domain discriminator.
    """

    def __init__(self, backbone: BackboneSpec, layer: str | int = -1, trainable: list[str] | None = None,
                 bottleneck_dim: int = 256, pooling: str = "avg", discriminator_hidden: int = 1024) -> None:
        super().__init__()
        trainable = ["*"] if trainable is None else trainable
        self.encoder = PooledEncoder(backbone, layer, trainable, bottleneck_dim, pooling)  # M_s
        self.head = nn.Linear(bottleneck_dim, 1)  # C: one defect logit
        self.target_encoder = copy.deepcopy(self.encoder)  # M_t, set from M_s when adversarial training begins
        self.discriminator = DomainDiscriminator(bottleneck_dim, discriminator_hidden)
        self.register_buffer("target_encoder_ready", torch.tensor(False))
        self.source_frozen = False

    def train(self, mode: bool = True) -> AdversarialAdaptationClassifier:
        super().train(mode)
        if self.source_frozen:
            self.encoder.eval()
            self.head.eval()
        return self

    def begin_adversarial_phase(self) -> None:
        """Freezes M_s and C (weights and statistics) and, the first time, sets M_t to a copy of M_s.

        ``requires_grad`` and module modes are not in checkpoints, so this runs again after every resume.
        """
        if not bool(self.target_encoder_ready):
            with torch.no_grad():
                self.target_encoder.load_state_dict(self.encoder.state_dict())
            self.target_encoder_ready.fill_(True)
        for module in (self.encoder, self.head):
            module.requires_grad_(False)
            module.eval()
        self.source_frozen = True

    def features(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        """M_s(x) for the source; M_t(x) for the target once it exists (M_s before)."""
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        if domain == "target" and bool(self.target_encoder_ready):
            return self.target_encoder(images)
        return self.encoder(images)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Defect logits [B] from encoder features."""
        return self.head(features).squeeze(1)

    def discriminate(self, source_features: torch.Tensor, target_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Domain logits (positive = source) of both domains from ONE pass, so D's BatchNorm sees both together
        (a pass per domain would remove each domain's mean, hiding first-order shift from D)."""
        logits = self.discriminator(torch.cat([source_features, target_features]))
        return logits[: source_features.shape[0]], logits[source_features.shape[0]:]

    def forward(self, images: torch.Tensor, domain: str = "target") -> torch.Tensor:
        """Defect logits [B] of images from ``domain``."""
        return self.classify(self.features(images, domain))
