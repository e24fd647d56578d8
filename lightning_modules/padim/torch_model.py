"""PaDiM (Defard et al., 2021): a Gaussian per feature-map position, Mahalanobis distance as anomaly map.

The training statistics are the float64 sums N, Σx and Σxxᵀ per position, accumulated batch by batch, so
memory does not grow with the number of training images. The Gaussians (mean μ, and the inverse L⁻¹ of the
Cholesky factor L of Σ + ε·I) are derived from the sums in float64 when first needed and cached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.anomaly_map import gaussian_blur_maps
from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor
from lightning_modules.components.target_recalibration import Gaussians

# The statistics' shapes depend on the feature grid, known only once images arrive.
STATISTICS = ("feature_sum", "outer_sum")
FITTED_HERE = "this run's training images"


class NotFittedError(RuntimeError):
    """The Gaussians were asked for before any training image was accumulated."""


class DamagedStatisticsError(ValueError):
    """Loaded statistics that no fit can produce: non-finite, mis-shaped, asymmetric or not positive definite."""


class PadimModel(nn.Module):
    """Frozen feature extractor + per-position Gaussians.

    Args:
        backbone: any shared-builder backbone (ImageNet, or a GMM-pretrained ``weights`` file).
        layers: the three layers whose outputs are concatenated, at the first one's resolution
            (ResNet layer1-3 = timm feature stages 1, 2, 3).
        num_features: size of the fixed random channel subset (ResNet-18: 100 of 448; WRN-50: 550 of 1792).
        seed: seed of the channel subset.
        covariance_eps: ε added to the covariance diagonal.
        blur_sigma: σ (pixels of the input image) of the Gaussian blur of the anomaly map.
    """

    def __init__(self, backbone: BackboneSpec, layers: list[str | int], num_features: int, seed: int = 0,
                 covariance_eps: float = 0.01, blur_sigma: float = 4.0) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, layers)
        total = sum(self.extractor.out_channels)
        if not 0 < num_features <= total:
            raise ValueError(f"num_features must be in [1, {total}] (the channels of layers {self.extractor.layers}"
                             f" of {backbone.name}), got {num_features}")
        if covariance_eps <= 0 or blur_sigma < 0:
            raise ValueError(f"need covariance_eps > 0 and blur_sigma >= 0, got {covariance_eps}, {blur_sigma}")
        self.covariance_eps = covariance_eps
        self.blur_sigma = blur_sigma
        subset = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_features]
        self.register_buffer("channel_index", subset.sort().values)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))  # N
        self.register_buffer("feature_sum", torch.zeros(0, dtype=torch.float64))  # Σx [P, D]
        self.register_buffer("outer_sum", torch.zeros(0, dtype=torch.float64))  # Σxxᵀ [P, D, D]
        self.register_buffer("grid_shape", torch.zeros(2, dtype=torch.long))  # (h, w) of the feature map
        self.register_buffer("mean", torch.zeros(0), persistent=False)  # μ [P, D]
        self.register_buffer("whitening", torch.zeros(0), persistent=False)  # L⁻¹, LLᵀ = Σ + εI, [P, D, D]
        self._gaussians_stale = True
        self.channel_total = total
        # Named in the errors of damaged statistics; the LightningModule sets it to the checkpoint it loads.
        self.statistics_origin = FITTED_HERE

    # ------------------------------------------------------------------------------------------ features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> embedding [B, D, h, w] at the first layer's resolution."""
        maps = list(self.extractor(images).values())
        grid = maps[0].shape[-2:]
        stacked = torch.cat([maps[0]] + [F.interpolate(m, size=grid, mode="nearest") for m in maps[1:]], dim=1)
        return stacked.index_select(1, self.channel_index)

    # ------------------------------------------------------------------------------------------ statistics

    def reset_statistics(self) -> None:
        self.statistics_origin = FITTED_HERE
        self.count.zero_()
        self.feature_sum = self.feature_sum.new_zeros(0)
        self.outer_sum = self.outer_sum.new_zeros(0)
        self.grid_shape.zero_()
        self._gaussians_stale = True

    @torch.no_grad()
    def accumulate(self, embedding: torch.Tensor) -> None:
        """Adds a batch of embeddings [B, D, h, w] to N, Σx and Σxxᵀ (float64)."""
        if self.count == 0:
            positions, dim = embedding.shape[-2] * embedding.shape[-1], embedding.shape[1]
            self.feature_sum = embedding.new_zeros(positions, dim, dtype=torch.float64)
            self.outer_sum = embedding.new_zeros(positions, dim, dim, dtype=torch.float64)
            self.grid_shape.copy_(torch.tensor(embedding.shape[-2:]))
        self._check_grid(embedding)
        x = embedding.flatten(2).permute(2, 0, 1).to(torch.float64)  # [P, B, D]
        self.count += x.shape[1]
        self.feature_sum += x.sum(dim=1)
        self.outer_sum += x.transpose(1, 2) @ x
        self._gaussians_stale = True

    def reduce_statistics(self, reduce_sum) -> None:
        """Replaces the sums by ``reduce_sum`` of them (the sum over data-parallel processes)."""
        for name in ("count", *STATISTICS):
            setattr(self, name, reduce_sum(getattr(self, name)))
        self._gaussians_stale = True

    def _check_grid(self, embedding: torch.Tensor, fitted: tuple[int, ...] | None = None) -> None:
        fitted = fitted or tuple(self.grid_shape.tolist())
        if tuple(embedding.shape[-2:]) != fitted:
            raise ValueError(f"PaDiM's Gaussians are for a {fitted[0]}x{fitted[1]} feature grid, but these images "
                             f"give {embedding.shape[-2]}x{embedding.shape[-1]}: use the image size of the fit")

    @property
    def is_fitted(self) -> bool:
        return bool(self.count > 1)

    @torch.no_grad()
    def covariance(self, regularised: bool = True) -> torch.Tensor:
        """Unbiased covariance from the sums, + ε·I when ``regularised``, float64 [P, D, D]."""
        n = float(self.count)
        mean = self.feature_sum / n
        # One [P, D, D] buffer, updated in place: Σxxᵀ − n·μμᵀ, / (n − 1), + ε on the diagonal.
        cov = torch.baddbmm(self.outer_sum, mean[:, :, None], mean[:, None, :], alpha=-n).div_(n - 1)
        if regularised:
            cov.diagonal(dim1=-2, dim2=-1).add_(self.covariance_eps)
        return cov

    @torch.no_grad()
    def gaussians(self) -> Gaussians:
        """The fitted per-position Gaussians (float64, covariance without ε), for recalibration."""
        if not self.is_fitted:
            raise NotFittedError(f"PaDiM has seen {int(self.count)} training images; recalibration needs a fit")
        return Gaussians(self.feature_sum / self.count, self.covariance(regularised=False))

    @torch.no_grad()
    def set_gaussians(self, gaussians: Gaussians, count: int) -> None:
        """Replaces the sums by those of ``count`` embeddings with these means and covariances (the inverse of
        :meth:`gaussians`), so a checkpoint holds the recalibrated statistics in the usual form."""
        mean, covariance = gaussians.mean.to(torch.float64), gaussians.covariance.to(torch.float64)
        if mean.shape != self.feature_sum.shape or covariance.shape != self.outer_sum.shape or count < 2:
            raise ValueError(f"expected a mean {tuple(self.feature_sum.shape)}, a covariance "
                             f"{tuple(self.outer_sum.shape)} and count >= 2, got {tuple(mean.shape)}, "
                             f"{tuple(covariance.shape)}, {count}")
        self.count.fill_(count)
        self.feature_sum = count * mean
        self.outer_sum = torch.baddbmm(covariance, mean[:, :, None], mean[:, None, :], beta=count - 1, alpha=count)
        self._gaussians_stale = True

    @torch.no_grad()
    def _update_gaussians(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"PaDiM has seen {int(self.count)} training images; it needs at least 2 "
                                 "(run fit first, or load a fitted checkpoint)")
        cholesky, info = torch.linalg.cholesky_ex(self.covariance())
        failed = int((info > 0).sum())
        if failed:
            raise self._damaged(f"the covariance of {failed} of {info.numel()} positions is not positive definite "
                                f"even with ε = {self.covariance_eps} added")
        self.mean = (self.feature_sum / self.count).float()
        # L⁻¹ once, in float64: scoring is then a matmul, which ONNX has (it has no triangular solve).
        identity = torch.eye(cholesky.shape[-1], dtype=cholesky.dtype, device=cholesky.device)
        self.whitening = torch.linalg.solve_triangular(cholesky, identity, upper=False).float()
        # As plain ints: an exported graph (torch.export) cannot branch on a buffer's values.
        self.gaussian_grid = tuple(self.grid_shape.tolist())
        self._gaussians_stale = False

    def _damaged(self, problem: str) -> DamagedStatisticsError:
        return DamagedStatisticsError(f"PaDiM statistics from {self.statistics_origin} are damaged: {problem}. They "
                                      "cannot come from a fit; fit again, or use an undamaged checkpoint")

    @torch.no_grad()
    def check_statistics(self) -> None:
        """Raises :class:`DamagedStatisticsError` unless the channel subset and the sums can come from a fit
        (positive definiteness is checked when the Gaussians are derived)."""
        index = self.channel_index
        distinct = index.unique().numel() == index.numel()
        if index.numel() and (index.min() < 0 or index.max() >= self.channel_total or not distinct):
            raise self._damaged(f"channel_index must hold distinct channels in [0, {self.channel_total})")
        count = float(self.count)
        if not (math.isfinite(count) and count >= 0 and count == int(count)):
            raise self._damaged(f"the image count N is {count}, not a whole number >= 0")
        if count == 0:
            return
        positions, dim = int(self.grid_shape.prod()), index.numel()
        if self.feature_sum.shape != (positions, dim) or self.outer_sum.shape != (positions, dim, dim):
            raise self._damaged(f"Σx {tuple(self.feature_sum.shape)} and Σxxᵀ {tuple(self.outer_sum.shape)} do not fit "
                                f"a {tuple(self.grid_shape.tolist())} grid of {dim} features")
        for name in STATISTICS:
            if not torch.isfinite(getattr(self, name)).all():
                raise self._damaged(f"{name} holds NaN or Inf")
        # Σxxᵀ is symmetric by construction; in chunks of positions, so no second copy of it is made.
        for chunk in self.outer_sum.split(64):
            if not torch.allclose(chunk, chunk.transpose(1, 2), rtol=1e-9, atol=1e-9 * float(chunk.abs().amax())):
                raise self._damaged("Σxxᵀ is not symmetric")

    # ------------------------------------------------------------------------------------------ scoring

    def mahalanobis(self, embedding: torch.Tensor) -> torch.Tensor:
        """Distance of each position's feature to its Gaussian: [B, D, h, w] -> [B, h, w] (float32)."""
        if self._gaussians_stale:
            self._update_gaussians()
        self._check_grid(embedding, self.gaussian_grid)
        with torch.autocast(embedding.device.type, enabled=False):
            centred = embedding.flatten(2).float().permute(2, 1, 0) - self.mean[:, :, None]  # [P, D, B]
            # ‖L⁻¹(x - μ)‖ = √((x - μ)ᵀ Σ⁻¹ (x - μ)), one matrix product per position.
            whitened = self.whitening @ centred
            distance = whitened.square().sum(dim=1).clamp_min(0).sqrt()  # [P, B]
        return distance.T.reshape(embedding.shape[0], *embedding.shape[-2:])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (image scores [B] = max of the map, anomaly maps [B, H, W])."""
        distance = self.mahalanobis(self.embed(images))
        maps = F.interpolate(distance[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.blur_sigma > 0:
            maps = gaussian_blur_maps(maps, self.blur_sigma)
        maps = maps[:, 0]
        return maps.flatten(1).amax(dim=1), maps

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Give the lazily shaped statistics the saved shapes before the copy.
        for name in STATISTICS:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        self._gaussians_stale = True
        if self.statistics_origin == FITTED_HERE:
            self.statistics_origin = "a loaded state dict"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.check_statistics()
