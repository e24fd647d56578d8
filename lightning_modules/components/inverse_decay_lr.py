"""The inverse-decay learning-rate schedule of DANN/tllib: lr_i = lr_0 · (1 + γ·i)^(−decay)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


class InverseDecayLR(LambdaLR):
    """Multiplies every group's initial lr by ``(1 + gamma * step) ** -decay`` (step it every training step).

    Args:
        optimizer: the optimizer whose groups are scaled (per-group lr multipliers are kept).
        gamma: 0.001 in tllib.
        decay: 0.75 in tllib.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float = 0.001, decay: float = 0.75,
                 last_epoch: int = -1) -> None:
        if gamma < 0 or decay < 0:
            raise ValueError(f"InverseDecayLR needs gamma >= 0 and decay >= 0, got gamma={gamma}, decay={decay}")
        self.gamma = gamma
        self.decay = decay
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        return (1.0 + self.gamma * step) ** -self.decay

