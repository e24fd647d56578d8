"""Gaussian-mixture pseudo-defects (paper 003, equations 1-11): parameters, sampler, renderer, losses.

θ_GMM = ({θ_Gauss_k}_{k=1..K}, s) with θ_Gauss_k = (v_color_k ∈ [-1,1]^C, μx, μy, σx, σy, ρ, π) (eqs 1-2).
Image coordinates run over [-1, 1]² (x along the width, y along the height).

The renderer ``render_defects`` is f_ano (eqs 3-7): batched, on the tensors' device and differentiable in
every parameter, so the indirect loss (eq 11) backpropagates through it. It works in log-space so that
very peaked or far-off Gaussians neither underflow nor divide by zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

#: density values per Gaussian besides its colour: μx, μy, σx, σy, ρ, π.
DENSITY_VALUES = 6
# Keeps a predicted Gaussian a proper density: σ > 0 and |ρ| < 1 (the sampler stays well inside both).
SIGMA_FLOOR = 1e-3
RHO_LIMIT = 0.999
WEIGHT_FLOOR = 1e-30
Reduction = Literal["mean", "none"]


def num_outputs(num_gaussians: int, num_channels: int) -> int:
    """Length of a flat θ_GMM, K(C+6)+1 (271 for K=30, C=3)."""
    return num_gaussians * (num_channels + DENSITY_VALUES) + 1


@dataclass
class GMMParams:
    """A batch of θ_GMM. Shapes: colors [B,K,C], means [B,K,2] (x, y), sigmas [B,K,2] (x, y), rho [B,K],
    weights [B,K] (π, summing to 1 over K), scale [B] (s)."""

    colors: torch.Tensor
    means: torch.Tensor
    sigmas: torch.Tensor
    rho: torch.Tensor
    weights: torch.Tensor
    scale: torch.Tensor

    @property
    def num_gaussians(self) -> int:
        return self.colors.shape[1]

    @property
    def num_channels(self) -> int:
        return self.colors.shape[2]

    def gaussians(self) -> torch.Tensor:
        """θ_Gauss_k as vectors [B, K, C+6] in the order of eq 2."""
        return torch.cat([self.colors, self.means, self.sigmas, self.rho[..., None], self.weights[..., None]], -1)

    def flatten(self) -> torch.Tensor:
        """[B, K(C+6)+1]: the K Gaussian vectors, then s."""
        return torch.cat([self.gaussians().flatten(1), self.scale[:, None]], 1)

    @classmethod
    def unflatten(cls, flat: torch.Tensor, num_gaussians: int, num_channels: int) -> GMMParams:
        expected = num_outputs(num_gaussians, num_channels)
        if flat.ndim != 2 or flat.shape[1] != expected:
            raise ValueError(f"a flat θ_GMM with K={num_gaussians}, C={num_channels} has shape [B, {expected}], "
                             f"got {tuple(flat.shape)}")
        gauss = flat[:, :-1].reshape(flat.shape[0], num_gaussians, num_channels + DENSITY_VALUES)
        c = num_channels
        return cls(gauss[..., :c], gauss[..., c:c + 2], gauss[..., c + 2:c + 4], gauss[..., c + 4], gauss[..., c + 5],
                   flat[:, -1])

    @classmethod
    def from_logits(cls, logits: torch.Tensor, num_gaussians: int, num_channels: int) -> GMMParams:
        """θ̂_GMM from a regressor's raw outputs with the paper's activations: tanh for v_color, μ and ρ,
        softplus for σ, softmax over the K Gaussians for π, sigmoid for s."""
        raw = cls.unflatten(logits, num_gaussians, num_channels)
        return cls(torch.tanh(raw.colors), torch.tanh(raw.means), F.softplus(raw.sigmas), torch.tanh(raw.rho),
                   torch.softmax(raw.weights, dim=1), torch.sigmoid(raw.scale))


def sample_gmm_params(batch: int, num_gaussians: int = 30, num_channels: int = 3,
                      generator: torch.Generator | None = None, device: torch.device | str | None = None) -> GMMParams:
    """Random θ_GMM: colour, μ, ρ ~ U[-1,1]; σ = softplus(N(0,1)) + 0.01; π = softmax(N(0,1)); s ~ U[0,1]."""
    if num_gaussians < 1 or num_channels < 1:
        raise ValueError(f"need num_gaussians >= 1 and num_channels >= 1, got {num_gaussians}, {num_channels}")
    shape = (batch, num_gaussians)

    def uniform(*size: int) -> torch.Tensor:
        return torch.rand(size, generator=generator, device=device) * 2 - 1

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=generator, device=device)

    return GMMParams(
        colors=uniform(*shape, num_channels),
        means=uniform(*shape, 2),
        sigmas=F.softplus(normal(*shape, 2)) + 0.01,
        rho=uniform(*shape),
        weights=torch.softmax(normal(*shape), dim=1),
        scale=torch.rand(batch, generator=generator, device=device),
    )


def _log_components(params: GMMParams, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """log p_Gauss_k(x, y) = log π_k + log N(x, y | μ_k, σ_k, ρ_k) (eq 3), [B, K, H, W].

    The quadratic form is split into a row term, a column term and the cross term ρ·dx·dy, so that only
    two operations run at the full [B, K, H, W] size.
    """
    device = params.means.device
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    sigma = params.sigmas.clamp_min(SIGMA_FLOOR)
    rho = params.rho.clamp(-RHO_LIMIT, RHO_LIMIT)[..., None]
    one_minus_rho2 = 1 - rho.square()
    dx = (xs - params.means[..., 0:1]) / sigma[..., 0:1]  # standardised offsets [B, K, W]
    dy = (ys - params.means[..., 1:2]) / sigma[..., 1:2]  # [B, K, H]
    log_norm = torch.log(2 * math.pi * sigma[..., 0:1] * sigma[..., 1:2]) + 0.5 * torch.log(one_minus_rho2)
    log_weight = torch.log(params.weights.clamp_min(WEIGHT_FLOOR))[..., None]
    # -(dx² - 2ρ·dx·dy + dy²) / (2(1 - ρ²)) + log π - log(2π σx σy √(1-ρ²))
    column_term = log_weight - log_norm - 0.5 * dx.square() / one_minus_rho2  # [B, K, W]
    row_term = -0.5 * dy.square() / one_minus_rho2  # [B, K, H]
    cross_slope = rho / one_minus_rho2 * dx  # [B, K, W]
    return column_term[..., None, :] + row_term[..., :, None] + cross_slope[..., None, :] * dy[..., :, None]


def render_defects(images: torch.Tensor, params: GMMParams) -> tuple[torch.Tensor, torch.Tensor]:
    """f_ano(I_norm, θ_GMM): images [B, 3, H, W] in [0, 1] -> (I_ano [B, 3, H, W] in [0, 1], M [B, H, W]).

    Eq 5: M = s·p_GMM / max p_GMM; eq 6: v_def = Σ_k s·p_Gauss_k / max p_GMM · v_color_k; eq 7 is applied in
    the [-1, 1] pixel range of v_color: with J = 2I - 1, J_ano = J(1 - M) + v_def. Because Σ_k of the weights
    in eq 6 is M, I_ano is a convex blend of I_norm and the colours and stays in [0, 1]. C = 1 paints the
    same value into every channel. Runs in float32 (float64 stays float64) even under autocast.
    """
    if images.ndim != 4 or images.shape[0] != params.scale.shape[0]:
        raise ValueError(f"images must be [B, C, H, W] with B = {params.scale.shape[0]} θ_GMM, got "
                         f"{tuple(images.shape)}")
    if params.num_channels not in (1, images.shape[1]):
        raise ValueError(f"θ_GMM has C={params.num_channels} colour values; the images have {images.shape[1]} "
                         f"channels (C must be 1 or {images.shape[1]})")
    dtype = torch.promote_types(images.dtype, torch.float32)
    with torch.autocast(images.device.type, enabled=False):
        params = GMMParams(*(t.to(dtype) for t in vars(params).values()))
        images = images.to(dtype)
        log_p = _log_components(params, images.shape[-2], images.shape[-1], dtype)  # log p_Gauss_k, eq 3
        # log p_GMM (eq 4) as a log-sum-exp whose exponentials are reused for the per-Gaussian shares.
        log_top = log_p.amax(dim=1, keepdim=True)
        relative = torch.exp(log_p - log_top)  # p_Gauss_k / max_k p_Gauss_k
        log_gmm = log_top + torch.log(relative.sum(dim=1, keepdim=True))
        log_peak = log_gmm.flatten(1).amax(1)[:, None, None, None]  # log max_{x,y} p_GMM
        scale = params.scale[:, None, None, None]
        share = relative * (scale * torch.exp(log_top - log_peak))  # s·p_Gauss_k / max p_GMM, [B,K,H,W]
        mask = share.sum(dim=1)  # eq 5: the shares add up to s·p_GMM / max p_GMM
        defect = torch.einsum("bkhw,bkc->bchw", share, params.colors)  # eq 6
        anomalous = images * (1 - mask[:, None]) + (defect + mask[:, None]) / 2  # eq 7 in [-1, 1], mapped back
    return anomalous, mask


def direct_loss(target: GMMParams, predicted: GMMParams, reduction: Reduction = "mean") -> torch.Tensor:
    """L_direct (eq 9), averaged over the batch (``reduction="none"``: one value per pair): each true Gaussian
    is matched to its nearest predicted one (mean squared error over its C+6 values), plus the squared error
    of s, divided by K+1."""
    true_gauss, pred_gauss = target.gaussians(), predicted.gaussians()
    # [B, K_true, K_pred]: mean squared error between every pair of Gaussian vectors.
    pair_errors = (true_gauss[:, :, None] - pred_gauss[:, None]).square().mean(-1)
    nearest = pair_errors.amin(dim=2).sum(dim=1)
    per_pair = ((target.scale - predicted.scale).square() + nearest) / (target.num_gaussians + 1)
    return _reduce(per_pair, reduction)


def indirect_loss(normal: torch.Tensor, anomalous: torch.Tensor, predicted: GMMParams,
                  reduction: Reduction = "mean") -> torch.Tensor:
    """L_indirect (eqs 10-11): mean squared error between I_ano and the re-rendering f_ano(I_norm, θ̂),
    over the batch (``reduction="none"``: one value per pair)."""
    rerendered, _ = render_defects(normal, predicted)
    per_pair = F.mse_loss(rerendered, anomalous.to(rerendered.dtype), reduction="none").flatten(1).mean(dim=1)
    return _reduce(per_pair, reduction)


def _reduce(per_pair: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction not in get_args(Reduction):
        raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {reduction!r}")
    return per_pair.mean() if reduction == "mean" else per_pair
