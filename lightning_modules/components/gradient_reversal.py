"""Gradient reversal (Ganin & Lempitsky, DANN): identity forward, gradient times −λ backward."""

from __future__ import annotations

import math

import torch
from torch import nn


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.coefficient, None


def reverse_gradient(inputs: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``inputs`` unchanged; the gradient flowing back through it is multiplied by ``-coefficient``."""
    return _ReverseGradient.apply(inputs, float(coefficient))


def reversal_coefficient(progress: float, gamma: float = 10.0) -> float:
    """DANN's schedule λ(p) = 2 / (1 + exp(−γ p)) − 1 for training progress p in [0, 1]: 0 at the start, → 1."""
    progress = min(max(progress, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class GradientReversal(nn.Module):
    """Gradient-reversal layer whose coefficient λ is set from outside (e.g. from the global step)."""

    def __init__(self, coefficient: float = 1.0) -> None:
        super().__init__()
        self.coefficient = coefficient

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(inputs, self.coefficient)

    def extra_repr(self) -> str:
        return f"coefficient={self.coefficient:.4f}"
