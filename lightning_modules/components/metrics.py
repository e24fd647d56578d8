"""Anomaly-detection metrics, gathered across DDP ranks by torchmetrics.

Every curve metric is computed here from the scores sorted once, highest first (:class:`ScoreRanking`):
the ROC and precision-recall curves have one point per distinct score, exactly as scikit-learn and
torchmetrics define them, and AUROC, AP, F1-max, FPR@95TPR and AUPRO of the same scores share the one sort.
A pixel set holds millions of scores, so a sort per metric was most of a test's cost. Only the order of
the scores matters: large raw scores (Mahalanobis distances, negative log-likelihoods) are never squashed
by a sigmoid (as torchmetrics does to inputs outside [0, 1]) and never tie where they differ.

Samples padded by the DistributedSampler are seen twice; the collectors drop repeated sample ids.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def sample_ids(paths: list[str]) -> torch.Tensor:
    """Stable 63-bit ids of sample paths, to drop the duplicates a padded sampler makes."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") >> 1 for p in paths],
        dtype=torch.long,
    )


class ScoreRanking:
    """The distinct scores, highest first (the thresholds of every curve), and how many scores reach each.

    numpy's vectorised sort does it; scores are never ranked again by any metric. A selected subset (the
    positives) is sorted on its own and located among the thresholds by binary search.
    """

    def __init__(self, scores: torch.Tensor) -> None:
        flat = scores.detach().flatten().cpu()
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.double()  # numpy has no bfloat16; float64 keeps distinct scores of any dtype distinct
        self.scores = flat.numpy()
        ranked = np.sort(self.scores)
        run_start = np.flatnonzero(np.concatenate([[True], ranked[1:] != ranked[:-1]]))
        self.thresholds = ranked[run_start][::-1]
        self.taken = (ranked.size - run_start)[::-1].astype(np.float64)

    def reaching(self, selected: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Per threshold: how many ``selected`` scores reach it, or the sum of their ``weights`` (float64)."""
        chosen = self.scores[selected]
        if weights is None:
            ranked = np.sort(chosen)
            return (ranked.size - np.searchsorted(ranked, self.thresholds, side="left")).astype(np.float64)
        order = np.argsort(chosen)
        below = np.searchsorted(chosen[order], self.thresholds, side="left")
        # Σ of the weights of the scores from each position up (0 past the end).
        from_here = np.concatenate([np.cumsum(weights[selected][order][::-1])[::-1], [0.0]])
        return from_here[below]

    def curve(self, target: torch.Tensor) -> BinaryCurve:
        true_positives = self.reaching(target.flatten().cpu().bool().numpy())
        return BinaryCurve(true_positives, self.taken - true_positives)


class BinaryCurve:
    """True and false positives at each distinct threshold, from the highest down: the ROC and
    precision-recall curves (one point per distinct score, as scikit-learn and torchmetrics draw them)
    and every metric read from them."""

    def __init__(self, true_positives: np.ndarray, false_positives: np.ndarray) -> None:
        self.true_positives, self.false_positives = true_positives, false_positives

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR) from (0, 0) on."""
        return (np.concatenate([[0.0], self.false_positives / self.false_positives[-1]]),
                np.concatenate([[0.0], self.true_positives / self.true_positives[-1]]))

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        tp, fp = self.true_positives, self.false_positives
        return tp / (tp + fp), tp / tp[-1]

    def auroc(self) -> float:
        fpr, tpr = self.roc()
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        """Σ (Rₖ − Rₖ₋₁) Pₖ over the thresholds, from the highest down (no interpolation)."""
        precision, recall = self.precision_recall()
        return float((np.diff(recall, prepend=0.0) * precision).sum())

    def f1_max(self) -> float:
        precision, recall = self.precision_recall()
        return float((2 * precision * recall / np.maximum(precision + recall, 1e-12)).max())

    def fpr_at_tpr(self, tpr_level: float = 0.95) -> float:
        """The false-positive rate at the first threshold whose true-positive rate reaches ``tpr_level``."""
        fpr, tpr = self.roc()
        return float(fpr[np.argmax(tpr >= tpr_level)])


def auroc(scores: torch.Tensor, target: torch.Tensor) -> float:
    return ScoreRanking(scores).curve(target).auroc()


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    return ScoreRanking(scores).curve(target).average_precision()


def f1_max(scores: torch.Tensor, target: torch.Tensor) -> float:
    return ScoreRanking(scores).curve(target).f1_max()


def fpr_at_tpr(scores: torch.Tensor, target: torch.Tensor, tpr_level: float = 0.95) -> float:
    return ScoreRanking(scores).curve(target).fpr_at_tpr(tpr_level)


def aupro(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3, ranking: ScoreRanking | None = None
          ) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it (MVTec AD).

    Regions are 8-connected components of each ground-truth mask and weigh equally; the FPR runs
    over all normal pixels of the set. The curve is exact: one point per distinct score. ``ranking``: the
    maps' :class:`ScoreRanking` when the caller has it already.
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
    num_normal = int((regions == 0).sum())
    if num_normal == 0:
        raise ValueError("AUPRO needs normal pixels to measure the false-positive rate")
    region_sizes = np.bincount(regions.ravel())
    ranking = ranking or ScoreRanking(maps)
    anomalous = regions.ravel() > 0
    overlap = 1.0 / (region_sizes[regions.ravel()] * num_regions)  # each region's pixels add up to 1 / regions
    fpr = np.concatenate([[0.0], (ranking.taken - ranking.reaching(anomalous)) / num_normal])
    pro = np.concatenate([[0.0], ranking.reaching(anomalous, overlap)])
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:inside], pro[:inside]
    if inside < fpr.size and x[-1] < fpr_limit:
        step = (fpr_limit - x[-1]) / (fpr[inside] - x[-1])
        x = np.append(x, fpr_limit)
        y = np.append(y, y[-1] + step * (pro[inside] - y[-1]))
    return float(np.trapezoid(y, x) / fpr_limit)


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


def has_both_classes(target: torch.Tensor) -> bool:
    """Whether binary labels hold both 0 and 1 (a linear scan: ``unique`` would sort millions of pixels)."""
    positive = target.bool()
    return bool(positive.any()) and not bool(positive.all())


def image_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Image-level rank metrics; empty when only one class is present."""
    if not has_both_classes(labels):
        return {}
    curve = ScoreRanking(scores).curve(labels)
    return {
        "image_auroc": curve.auroc(),
        "image_ap": curve.average_precision(),
        "image_f1_max": curve.f1_max(),
        "image_fpr95": curve.fpr_at_tpr(),
    }


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel-level metrics over [N, H, W] maps and binary masks, from one sort of the pixels."""
    flat_masks = masks.flatten()
    if not has_both_classes(flat_masks):
        return {}
    ranking = ScoreRanking(maps)
    curve = ranking.curve(flat_masks)
    return {
        "pixel_auroc": curve.auroc(),
        "pixel_ap": curve.average_precision(),
        "pixel_f1_max": curve.f1_max(),
        "pixel_fpr95": curve.fpr_at_tpr(),
        "pixel_aupro": aupro(maps, masks, fpr_limit, ranking),
    }
