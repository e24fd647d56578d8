"""Cross-scale normalizing flow (CS-Flow, Rudolph et al. WACV 2022) as a FrEIA 0.2 graph.

The flow maps the feature maps of one image at several scales (largest first) jointly to Gaussian
latents z of the same shapes. Each block is a fixed random channel permutation per scale followed by a
GLOW-style affine coupling that transforms both channel halves. The coupling's subnetwork sees every
scale at once: each scale has its own k×k conv -> LeakyReLU -> k×k conv path, and its hidden map also
feeds its neighbours (bilinear upsampling + conv towards the larger scale, stride-2 conv towards the
smaller one). A learnable per-scale gain, initialised to 0, multiplies the subnetwork's output, so every
block starts as the identity. No BatchNorm anywhere: the map must stay a fixed function of its input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from FrEIA.framework import GraphINN, InputNode, Node, OutputNode
from FrEIA.modules import InvertibleModule
from torch import nn

Shape = tuple[int, int, int]

# 2/π rounded as in the paper, so clamp·0.636·atan(s/clamp) saturates just below ±clamp.
SOFT_CLAMP_SLOPE = 0.636


def soft_clamp(log_scale: torch.Tensor, clamp: float) -> torch.Tensor:
    """clamp·0.636·atan(s/clamp): ≈ s near 0, bounded by ±clamp, so exp(s) can never overflow."""
    return clamp * SOFT_CLAMP_SLOPE * torch.atan(log_scale / clamp)


class ScalewisePermutation(InvertibleModule):
    """A fixed random channel permutation of every scale (log-det 0), drawn once from ``seed``."""

    def __init__(self, dims_in: Sequence[Shape], seed: int = 0) -> None:
        super().__init__(dims_in)
        generator = torch.Generator().manual_seed(seed)
        for index, (channels, _, _) in enumerate(dims_in):
            order = torch.randperm(channels, generator=generator)
            self.register_buffer(f"order_{index}", order)
            self.register_buffer(f"inverse_{index}", torch.argsort(order))

    def forward(self, x_or_z, c=None, rev: bool = False, jac: bool = True):
        kind = "inverse" if rev else "order"
        out = tuple(x[:, getattr(self, f"{kind}_{i}")] for i, x in enumerate(x_or_z))
        return out, torch.zeros(out[0].shape[0], dtype=out[0].dtype, device=out[0].device)

    def output_dims(self, input_dims):
        return input_dims


class CrossScaleSubnet(nn.Module):
    """(s, t) for every scale from the conditioning half of every scale.

    Per scale i: h_i = LeakyReLU(conv_k(x_i)); out_i = conv_k(h_i) + conv_k(up(h_{i+1})) + conv_k/2(h_{i-1}),
    then out_i · gain_i with gain_i initialised to 0.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int,
                 num_scales: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.num_scales = num_scales
        self.hidden = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad) for _ in range(num_scales))
        self.same = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad) for _ in range(num_scales))
        # from_smaller[i] feeds scale i from scale i+1; from_larger[i] feeds scale i+1 from scale i.
        self.from_smaller = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad) for _ in range(num_scales - 1))
        self.from_larger = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad, stride=2)
            for _ in range(num_scales - 1))
        self.gains = nn.Parameter(torch.zeros(num_scales))
        self.activation = nn.LeakyReLU(0.1)

    def forward(self, halves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [self.activation(conv(x)) for conv, x in zip(self.hidden, halves, strict=True)]
        outs = [conv(h) for conv, h in zip(self.same, hidden, strict=True)]
        for i in range(self.num_scales - 1):
            size = outs[i].shape[-2:]
            upsampled = F.interpolate(hidden[i + 1], size=size, mode="bilinear", align_corners=False)
            outs[i] = outs[i] + self.from_smaller[i](upsampled)
            downsampled = self.from_larger[i](hidden[i])
            if downsampled.shape[-2:] != outs[i + 1].shape[-2:]:
                # Odd sides: the backbone and a stride-2 conv may round half a pixel differently.
                downsampled = F.interpolate(downsampled, size=outs[i + 1].shape[-2:], mode="bilinear",
                                            align_corners=False)
            outs[i + 1] = outs[i + 1] + downsampled
        return [out * gain for out, gain in zip(outs, self.gains, strict=True)]


class CrossScaleCoupling(InvertibleModule):
    """GLOW-style affine coupling over all scales at once, transforming both channel halves.

    x = [x1, x2] per scale; y2 = x2·exp(s1(x1)) + t1(x1), then y1 = x1·exp(s2(y2)) + t2(y2), with
    s = soft_clamp(·) and (s, t) from a :class:`CrossScaleSubnet`. log|det J| = Σ s1 + Σ s2 per sample.
    """

    def __init__(self, dims_in: Sequence[Shape], hidden_channels: int = 1024, kernel_size: int = 3,
                 clamp: float = 3.0) -> None:
        super().__init__(dims_in)
        channels = {shape[0] for shape in dims_in}
        if len(channels) != 1:
            raise ValueError(f"every scale needs the same number of channels, got shapes {list(dims_in)}")
        total = channels.pop()
        self.split = (total // 2, total - total // 2)
        self.clamp = clamp
        scales = len(dims_in)
        # Each subnet returns s and t for the half it transforms.
        self.subnet_second = CrossScaleSubnet(self.split[0], 2 * self.split[1], hidden_channels, kernel_size, scales)
        self.subnet_first = CrossScaleSubnet(self.split[1], 2 * self.split[0], hidden_channels, kernel_size, scales)

    def _affine(self, subnet: CrossScaleSubnet, condition: Sequence[torch.Tensor]):
        log_scales, shifts = zip(*(out.chunk(2, dim=1) for out in subnet(condition)), strict=True)
        return [soft_clamp(s, self.clamp) for s in log_scales], list(shifts)

    def forward(self, x_or_z, c=None, rev: bool = False, jac: bool = True):
        first, second = zip(*(x.split(self.split, dim=1) for x in x_or_z), strict=True)
        log_det = torch.zeros(x_or_z[0].shape[0], dtype=x_or_z[0].dtype, device=x_or_z[0].device)
        if not rev:
            s1, t1 = self._affine(self.subnet_second, first)
            second = [x * torch.exp(s) + t for x, s, t in zip(second, s1, t1, strict=True)]
            s2, t2 = self._affine(self.subnet_first, second)
            first = [x * torch.exp(s) + t for x, s, t in zip(first, s2, t2, strict=True)]
            log_det = log_det + sum(s.flatten(1).sum(1) for s in (*s1, *s2))
        else:
            s2, t2 = self._affine(self.subnet_first, second)
            first = [(y - t) * torch.exp(-s) for y, s, t in zip(first, s2, t2, strict=True)]
            s1, t1 = self._affine(self.subnet_second, first)
            second = [(y - t) * torch.exp(-s) for y, s, t in zip(second, s1, t1, strict=True)]
            log_det = log_det - sum(s.flatten(1).sum(1) for s in (*s1, *s2))
        return tuple(torch.cat(halves, dim=1) for halves in zip(first, second, strict=True)), log_det

    def output_dims(self, input_dims):
        return input_dims


class CrossScaleFlow(nn.Module):
    """The CS-Flow graph: per block a :class:`ScalewisePermutation` and a :class:`CrossScaleCoupling`.

    Args:
        shapes: (C, H, W) of every scale's feature map, largest scale first.
        hidden_channels: width of the subnetworks (1024 in the paper).
        kernel_sizes: one coupling block per entry, with that conv kernel (paper: 3, 3, 3, 5).
        clamp: soft-clamp bound of the log-scales (3 in the paper).
        seed: seed of the fixed permutations.
    """

    def __init__(self, shapes: Sequence[Shape], hidden_channels: int = 1024,
                 kernel_sizes: Sequence[int] = (3, 3, 3, 5), clamp: float = 3.0, seed: int = 0) -> None:
        super().__init__()
        if len(shapes) < 2:
            raise ValueError(f"a cross-scale flow needs at least 2 scales, got shapes {list(shapes)}")
        if any(k % 2 == 0 or k < 1 for k in kernel_sizes) or not kernel_sizes:
            raise ValueError(f"kernel_sizes must be odd positive sizes, one per block; got {list(kernel_sizes)}")
        if clamp <= 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        self.shapes = [tuple(int(d) for d in shape) for shape in shapes]
        inputs = [InputNode(*shape, name=f"scale_{i}") for i, shape in enumerate(self.shapes)]
        nodes: list[Node] = list(inputs)
        previous = [(node, 0) for node in inputs]
        for block, kernel_size in enumerate(kernel_sizes):
            permute = Node(previous, ScalewisePermutation, {"seed": seed + block}, name=f"permute_{block}")
            couple = Node([(permute, i) for i in range(len(shapes))], CrossScaleCoupling,
                          {"hidden_channels": hidden_channels, "kernel_size": kernel_size, "clamp": clamp},
                          name=f"coupling_{block}")
            nodes += [permute, couple]
            previous = [(couple, i) for i in range(len(shapes))]
        nodes += [OutputNode(out, name=f"z_{i}") for i, out in enumerate(previous)]
        self.graph = GraphINN(nodes)

    @property
    def dims(self) -> int:
        """D, the number of latent dimensions of one sample."""
        return sum(math.prod(shape) for shape in self.shapes)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """features per scale [B, C, H_i, W_i] -> (z per scale, log|det J| [B]), in float32 at least."""
        return self._run(features, rev=False)

    def inverse(self, z: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self._run(z, rev=True)

    def _run(self, inputs: Sequence[torch.Tensor], rev: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        # Autocast off: exp(s) and a log-det summed over D terms lose too much in bf16/fp16.
        with torch.autocast(device_type=inputs[0].device.type, enabled=False):
            wide = [t if t.dtype == torch.float64 else t.float() for t in inputs]
            out, log_det = self.graph(wide, rev=rev, jac=True)
        return list(out), log_det
