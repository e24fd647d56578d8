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
later layers features of a kind they never saw. A frozen stage is moved only relative to the source
(``anchored_statistics``): its statistics change so that it normalises the new domain's inputs as its own
statistics normalised the source's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class BatchNormStatistics(nn.Module):
    """Another set of running statistics for every BatchNorm of a network, used instead of the layers' own by
    ``functional_call(network, statistics.as_buffers(), ...)``.

    Stored by position (``mean_<i>``, ``var_<i>``, ``count_<i>``), so checkpoints keep their keys, and keyed to
    the layers by name at use, which survives SyncBatchNorm conversion (same names). As plain buffers they load
    with ``weights_only`` and DDP broadcasts them like any other; ``persistent=False`` keeps them out of the
    state dict (statistics fitted per run, not trained).
    """

    def __init__(self, network: nn.Module, persistent: bool = True) -> None:
        super().__init__()
        layers = named_batch_norms(network)
        self.layer_names = [name for name, _ in layers]
        for index, (_, layer) in enumerate(layers):
            self.register_buffer(f"mean_{index}", layer.running_mean.detach().clone(), persistent)
            self.register_buffer(f"var_{index}", layer.running_var.detach().clone(), persistent)
            self.register_buffer(f"count_{index}", layer.num_batches_tracked.detach().clone(), persistent)

    def as_buffers(self) -> dict[str, torch.Tensor]:
        """{network buffer name: this set's tensor}, for ``functional_call`` (BatchNorm updates them in place)."""
        buffers = {}
        for index, name in enumerate(self.layer_names):
            buffers[f"{name}.running_mean"] = getattr(self, f"mean_{index}")
            buffers[f"{name}.running_var"] = getattr(self, f"var_{index}")
            buffers[f"{name}.num_batches_tracked"] = getattr(self, f"count_{index}")
        return buffers

    def store(self, name: str, mean: torch.Tensor, var: torch.Tensor) -> None:
        index = self.layer_names.index(name)
        getattr(self, f"mean_{index}").copy_(mean)
        getattr(self, f"var_{index}").copy_(var)


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def named_batch_norms(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


def trained_batch_norms(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorms whose statistics training updated: those with a trainable parameter."""
    return [(name, m) for name, m in named_batch_norms(module) if any(p.requires_grad for p in m.parameters())]


def restorer(layers: list[tuple[str, _BatchNorm]]) -> Callable[[], None]:
    """A function that puts the layers' running mean and variance back to what they are now."""
    saved = [(layer.running_mean.clone(), layer.running_var.clone()) for _, layer in layers]

    def restore() -> None:
        for (_, layer), (mean, var) in zip(layers, saved, strict=True):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)

    return restore


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


@torch.no_grad()
def input_moments(forward: Callable[[torch.Tensor], object], layers: list[tuple[str, _BatchNorm]],
                  batches: Iterable[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's exact per-channel input (mean, unbiased variance) over every image of ``batches``, one
    ``forward`` per batch: what the layers normalise (run ``forward`` in eval mode)."""
    moments = {name: ChannelMoments() for name, _ in layers}
    handles = [layer.register_forward_pre_hook(lambda _m, inputs, name=name: moments[name].add(inputs[0]))
               for name, layer in layers]
    try:
        for images in batches:
            forward(images)
    finally:
        for handle in handles:
            handle.remove()
    return {name: moments[name].result() for name, _ in layers if moments[name].count}


def anchored_statistics(layer: _BatchNorm, source: tuple[torch.Tensor, torch.Tensor],
                        target: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Running statistics under which ``layer`` normalises inputs of moments ``target`` (mean, variance) as its
    own running statistics (μ_r, σ_r² = var_r + ε) normalise inputs of moments ``source``. The source's normalised
    input has mean a = (μ_s − μ_r)/σ_r and spread σ_s/σ_r; the target's, (x − μ')/σ', gets the same with
    σ' = σ_t·σ_r/σ_s and μ' = μ_t − a·σ' (each σ with the layer's ε). With ``source`` equal to the layer's own
    statistics this is AdaBN: (μ_t, var_t)."""
    eps = layer.eps
    running_mean, running_var = (t.to(torch.float64) for t in (layer.running_mean, layer.running_var))
    source_mean, source_var, target_mean, target_var = (t.to(torch.float64) for t in (*source, *target))
    running_std = (running_var + eps).sqrt()
    std = (target_var + eps).sqrt() * running_std / (source_var + eps).sqrt()
    mean = target_mean - (source_mean - running_mean) / running_std * std
    return mean, (std.square() - eps).clamp_min(0)
