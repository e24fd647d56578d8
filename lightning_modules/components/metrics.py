"""Anomaly-detection metrics, gathered across DDP ranks by torchmetrics.

torchmetrics applies a sigmoid to binary-curve inputs outside [0, 1]; large raw scores (Mahalanobis
distances, negative log-likelihoods) then saturate and tie. Every score is therefore replaced by its
dense rank scaled to [0, 1] before a curve is computed: the order, and so every rank metric, is
unchanged, and nothing saturates.

Samples padded by the DistributedSampler are seen twice; the collectors drop repeated sample ids.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
)
from torchmetrics.utilities import dim_zero_cat


def rank_normalize(scores: torch.Tensor) -> torch.Tensor:
    """Dense ranks scaled to [0, 1] in float64: ties stay ties, order is kept exactly."""
    unique, ranks = torch.unique(scores.double(), sorted=True, return_inverse=True)
    return ranks.double() / max(unique.numel() - 1, 1)


def sample_ids(paths: list[str]) -> torch.Tensor:
    """Stable 63-bit ids of sample paths, to drop the duplicates a padded sampler makes."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") >> 1 for p in paths],
        dtype=torch.long,
    )


def auroc(scores: torch.Tensor, target: torch.Tensor) -> float:
    return float(binary_auroc(rank_normalize(scores), target.long()))


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    return float(binary_average_precision(rank_normalize(scores), target.long()))


def f1_max(scores: torch.Tensor, target: torch.Tensor) -> float:
    precision, recall, _ = binary_precision_recall_curve(rank_normalize(scores), target.long())
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return float(f1.max())


def fpr_at_tpr(scores: torch.Tensor, target: torch.Tensor, tpr_level: float = 0.95) -> float:
    """The false-positive rate at the first threshold whose true-positive rate reaches ``tpr_level``."""
    fpr, tpr, _ = binary_roc(rank_normalize(scores), target.long())
    return float(fpr[torch.nonzero(tpr >= tpr_level)[0, 0]])


def aupro(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it (MVTec AD).

    Regions are 8-connected components of each ground-truth mask and weigh equally; the FPR runs
    over all normal pixels of the set. The curve is exact: one point per distinct score.
    """
    masks_np = masks.bool().cpu().numpy()
    regions = np.zeros(masks_np.shape, dtype=np.int64)
    num_regions = 0
    for i, mask in enumerate(masks_np):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions[i] = np.where(labelled > 0, labelled + num_regions, 0)
        num_regions += count
    if num_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region in the ground-truth masks")
    regions_t = torch.from_numpy(regions).flatten()
    num_normal = int((regions_t == 0).sum())
    if num_normal == 0:
        raise ValueError("AUPRO needs normal pixels to measure the false-positive rate")
    region_sizes = torch.bincount(regions_t).double()
    scores = maps.flatten().double().cpu()
    order = torch.argsort(scores, descending=True)
    scores, regions_t = scores[order], regions_t[order]
    is_normal = regions_t == 0
    fpr = torch.cumsum(is_normal.double(), 0) / num_normal
    overlap_step = torch.where(is_normal, 0.0, 1.0 / (region_sizes[regions_t] * num_regions))
    pro = torch.cumsum(overlap_step, 0)
    # One curve point per distinct threshold: the last pixel of each run of equal scores.
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    fpr = torch.cat([torch.zeros(1, dtype=torch.double), fpr[last_of_tie]])
    pro = torch.cat([torch.zeros(1, dtype=torch.double), pro[last_of_tie]])
    inside = int(torch.searchsorted(fpr, torch.tensor(fpr_limit, dtype=torch.double), right=True))
    x, y = fpr[:inside], pro[:inside]
    if inside < fpr.numel() and x[-1] < fpr_limit:
        step = (fpr_limit - x[-1]) / (fpr[inside] - x[-1])
        x = torch.cat([x, torch.tensor([fpr_limit], dtype=torch.double)])
        y = torch.cat([y, (y[-1] + step * (pro[inside] - y[-1])).view(1)])
    return float(torch.trapezoid(y, x) / fpr_limit)


class ScoreCollector(Metric):
    """Gathers per-sample scores and labels (optionally keyed by sample id) across ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        scores = scores.detach().float()
        if not torch.isfinite(scores).all():
            raise ValueError("non-finite anomaly scores reached the metrics; the model diverged")
        self.scores.append(scores)
        self.targets.append(targets.detach().to(scores.device, torch.uint8))  # one device for the whole state
        if ids is None:
            ids = torch.full((scores.shape[0],), -1, dtype=torch.long)
        self.ids.append(ids.to(scores.device))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        scores, targets, ids = (dim_zero_cat(s) for s in (self.scores, self.targets, self.ids))
        keyed = ids >= 0
        if keyed.any():
            # One entry per id, in id order: the same samples in the same order on any number of processes.
            _, first = np.unique(ids[keyed].cpu().numpy(), return_index=True)
            keep = torch.cat([torch.nonzero(keyed).flatten()[torch.from_numpy(first).to(ids.device)],
                              torch.nonzero(~keyed).flatten()])
            scores, targets = scores[keep], targets[keep]
        return scores, targets


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> float:
    """Accuracy of hard decisions from bounded probabilities (a classifier's sigmoid output)."""
    return float(((probabilities >= threshold).long() == labels.long()).double().mean())


def image_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Image-level rank metrics; empty when only one class is present."""
    if labels.unique().numel() < 2:
        return {}
    return {
        "image_auroc": auroc(scores, labels),
        "image_ap": average_precision(scores, labels),
        "image_f1_max": f1_max(scores, labels),
        "image_fpr95": fpr_at_tpr(scores, labels),
    }


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel-level metrics over [N, H, W] maps and binary masks."""
    flat_scores, flat_masks = maps.flatten(), masks.flatten()
    if flat_masks.unique().numel() < 2:
        return {}
    return {
        "pixel_auroc": auroc(flat_scores, flat_masks),
        "pixel_ap": average_precision(flat_scores, flat_masks),
        "pixel_f1_max": f1_max(flat_scores, flat_masks),
        "pixel_fpr95": fpr_at_tpr(flat_scores, flat_masks),
        "pixel_aupro": aupro(maps, masks, fpr_limit),
    }
