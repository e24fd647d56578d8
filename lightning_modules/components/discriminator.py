"""Domain discriminator of adversarial domain adaptation: features in, one source-vs-target logit out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SOURCE_LABEL = 1.0
TARGET_LABEL = 0.0


class DomainDiscriminator(nn.Sequential):
    """(Linear → BatchNorm → ReLU) × 2, then Linear to a single logit (positive = source).

    Args:
        in_features: width of the features it judges.
        hidden: width of the two hidden layers (1024 in DANN/tllib).
    """

    def __init__(self, in_features: int, hidden: int = 1024) -> None:
        if in_features < 1 or hidden < 1:
            raise ValueError(f"DomainDiscriminator needs in_features >= 1 and hidden >= 1, got {in_features}, {hidden}")
        super().__init__(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, in_features] -> logits [B]."""
        return super().forward(features).squeeze(1)


def domain_targets(logits: torch.Tensor, label: float) -> torch.Tensor:
    return torch.full_like(logits, label, dtype=torch.float32)


def domain_loss(source_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy (with logits, autocast-safe) of telling source (1) from target (0), domains weighted equally."""
    source = F.binary_cross_entropy_with_logits(source_logits.float(), domain_targets(source_logits, SOURCE_LABEL))
    target = F.binary_cross_entropy_with_logits(target_logits.float(), domain_targets(target_logits, TARGET_LABEL))
    return 0.5 * (source + target)


def domain_accuracy(source_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose domain the discriminator gets right (0.5 = features indistinguishable)."""
    correct = torch.cat([source_logits.detach() > 0, target_logits.detach() <= 0])
    return correct.float().mean()
