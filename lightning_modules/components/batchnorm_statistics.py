"""BatchNorm statistics re-estimated on another domain, layer after layer (AdaBN).

Each BatchNorm normalises its input with running statistics. On a shifted domain those are the source's, so the
features reaching every later layer are off. AdaBN replaces them with the new domain's moments of each layer's
input. The layers are measured one after another in the order the forward pass reaches them, each with the
earlier layers already normalising with their new statistics: a single pass in train mode would measure the
earlier layers' batch-normalised inputs, not what evaluation feeds them. Over many batches (DANN's target train
split) that is one pass per layer, each stopped at it (``layer_input``); when the images fit in one batch, a
forward pre-hook can decide each layer just before it normalises (``target_recalibration.batchnorm_recalibration``).

Only the BatchNorms whose statistics were learned in training (those with trainable parameters) are touched: a
frozen stage kept its pretrained statistics for the source too, and giving it target statistics would feed the
later layers features of a kind they never saw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def named_batch_norms(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


def trained_batch_norms(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorms whose statistics training updated: those with a trainable parameter."""
    return [(name, m) for name, m in named_batch_norms(module) if any(p.requires_grad for p in m.parameters())]


class _LayerReached(Exception):
    """Stops a forward pass once the layer whose input is being measured has seen it."""


def layer_input(forward: Callable[[torch.Tensor], object], layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``layer`` receives when ``forward(images)`` runs; the pass stops there."""
    captured = []

    def capture(_module, inputs):
        captured.append(inputs[0].detach())
        raise _LayerReached

    handle = layer.register_forward_pre_hook(capture)
    try:
        forward(images)
    except _LayerReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the forward pass never reached {type(layer).__name__} {layer}")
    return captured[0]


def forward_order(forward: Callable[[torch.Tensor], object], images: torch.Tensor,
                  layers: list[tuple[str, _BatchNorm]]) -> list[tuple[str, _BatchNorm]]:
    """``layers`` that ``forward(images)`` reaches, in the order it first reaches them."""
    reached: list[str] = []
    handles = [layer.register_forward_pre_hook(lambda _m, _i, name=name: reached.append(name))
               for name, layer in layers]
    try:
        forward(images)
    finally:
        for handle in handles:
            handle.remove()
    position = {name: index for index, name in enumerate(dict.fromkeys(reached))}
    return sorted((item for item in layers if item[0] in position), key=lambda item: position[item[0]])


class ChannelMoments:
    """Exact per-channel mean and unbiased variance of tensors [N, C, ...] seen batch by batch (float64).

    Batches are merged with Chan et al.'s pairwise update, so the result is that of all values at once,
    including the variance between batches.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = self.m2 = None

    def add(self, values: torch.Tensor) -> None:
        channels = values.detach().double().transpose(0, 1).reshape(values.shape[1], -1)
        count = channels.shape[1]
        mean = channels.mean(dim=1)
        m2 = (channels - mean[:, None]).pow(2).sum(dim=1)
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * count / total)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, unbiased variance), as BatchNorm stores its running statistics."""
        if self.count < 2:
            raise ValueError(f"need at least 2 values per channel for a variance, got {self.count}")
        return self.mean, self.m2 / (self.count - 1)
