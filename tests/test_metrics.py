import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from lightning_modules.components.metrics import (
    ScoreCollector,
    aupro,
    auroc,
    average_precision,
    f1_max,
    fpr_at_tpr,
    image_metrics,
    pixel_metrics,
    sample_ids,
)


@pytest.fixture
def random_scores():
    generator = torch.Generator().manual_seed(0)
    target = (torch.rand(500, generator=generator) < 0.3).long()
    scores = torch.randn(500, generator=generator) + 0.8 * target
    return scores, target


def test_aupro_reference_vector():
    preds = (torch.arange(2800, dtype=torch.float64) / 2800).view(1, 400, 7)
    for columns in ([3], [1, 3, 5]):
        masks = torch.zeros(1, 400, 7)
        masks[..., columns] = 1
        assert aupro(preds, masks, fpr_limit=1 / 3) == pytest.approx(1 / 6, abs=1e-3)


def test_aupro_weighs_regions_equally():
    maps = torch.zeros(1, 10, 10)
    masks = torch.zeros(1, 10, 10)
    masks[0, 0:2, 0:2] = 1  # small region, found
    masks[0, 5:10, 5:10] = 1  # large region, missed
    maps[0, 0:2, 0:2] = 1.0
    # Curve: (0, 0) -> (0, 0.5) once the small region is found -> (1, 1) when everything else,
    # tied at 0, is taken. Up to FPR 0.3: 0.3 * (0.5 + 0.65) / 2, divided by 0.3 = 0.575; a pixel-weighted
    # overlap would give far less, since the missed region is 6x larger.
    assert aupro(maps, masks) == pytest.approx(0.575)
    perfect = masks.clone()
    assert aupro(perfect, masks) == pytest.approx(1.0)


def test_rank_metrics_match_scikit_learn(random_scores):
    scores, target = random_scores
    y, s = target.numpy(), scores.numpy()
    assert auroc(scores, target) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert average_precision(scores, target) == pytest.approx(average_precision_score(y, s), abs=1e-6)
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert f1_max(scores, target) == pytest.approx(f1, abs=1e-6)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert fpr_at_tpr(scores, target) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-6)
    best_threshold = np.sort(s)[np.argmax([f1_score(y, s >= t) for t in np.sort(s)])]
    assert f1_max(scores, target) == pytest.approx(f1_score(y, s >= best_threshold), abs=1e-6)


def test_half_precision_scores_rank_like_their_float_values(random_scores):
    scores, target = random_scores
    for dtype in (torch.bfloat16, torch.float16):
        low = scores.to(dtype)
        assert image_metrics(low, target) == image_metrics(low.float(), target)


def test_huge_raw_scores_still_rank(random_scores):
    _, target = random_scores
    order = torch.randperm(target.numel(), generator=torch.Generator().manual_seed(1))
    # Scores from 1e6 to 1e9 that separate the classes perfectly, with gaps far below float32 resolution.
    scores = 1e6 + torch.arange(target.numel(), dtype=torch.float64)[order] * 1.0
    scores = torch.where(target.bool(), scores + 9e8, scores)
    assert auroc(scores, target) == 1.0
    assert average_precision(scores, target) == 1.0
    # The naive route saturates: torchmetrics' sigmoid makes every score 1.0 and AUROC 0.5.
    from torchmetrics.functional.classification import binary_auroc

    assert float(binary_auroc(scores.float(), target)) == pytest.approx(0.5)


def test_tied_scores_form_one_threshold():
    # Scores 1e6 apart at 5e8 are one float64 value each; the two tied ones form a single ROC point.
    scores = torch.tensor([5e8, 1e6, 5e8, 2e9], dtype=torch.float64)
    target = torch.tensor([1, 0, 0, 1])
    # Thresholds 2e9, 5e8 (one positive and one negative together), 1e6: ROC (0,0) (0,.5) (.5,1) (1,1).
    assert auroc(scores, target) == pytest.approx(0.5 * 0.5 * (0.5 + 1.0) + 0.5 * 1.0)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """AUPRO by its definition, one threshold at a time: the per-region overlap averaged over the regions of
    every image, against the FPR over all normal pixels, the last segment interpolated at the limit."""
    from scipy import ndimage

    regions = [(i, labelled == r) for i, mask in enumerate(masks)
               for labelled, count in [ndimage.label(mask, structure=np.ones((3, 3)))] for r in range(1, count + 1)]
    normal = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        found = maps >= threshold
        overlap = np.mean([found[i][region].mean() for i, region in regions])
        points.append((found[normal].mean(), overlap))
    fpr, pro = np.array(points).T
    inside = np.searchsorted(fpr, fpr_limit, side="right")
    x, y = list(fpr[:inside]), list(pro[:inside])
    if inside < len(fpr) and x[-1] < fpr_limit:
        y.append(y[-1] + (fpr_limit - x[-1]) / (fpr[inside] - x[-1]) * (pro[inside] - y[-1]))
        x.append(fpr_limit)
    return float(np.trapezoid(y, x) / fpr_limit)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_their_definitions_on_random_maps(seed):
    """The one-sort pixel metrics against scikit-learn's curves and AUPRO computed threshold by threshold,
    on maps with many ties (values on a 0.02 grid) and several regions per image."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, 24, 24), dtype=np.uint8)
    for image in masks[1:]:
        for _ in range(rng.integers(1, 4)):
            row, col, height, width = rng.integers(0, 18), rng.integers(0, 18), rng.integers(1, 7), rng.integers(1, 7)
            image[row:row + height, col:col + width] = 1
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 2).astype(np.float32)
    metrics = pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks), fpr_limit=0.3)
    y, s = masks.ravel(), maps.ravel()
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    precision, recall, _ = precision_recall_curve(y, s)
    expected = {
        "pixel_auroc": roc_auc_score(y, s),
        "pixel_ap": average_precision_score(y, s),
        "pixel_f1_max": np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12)),
        "pixel_fpr95": fpr[np.argmax(tpr >= 0.95)],
        "pixel_aupro": reference_aupro(maps, masks, 0.3),
    }
    assert metrics == pytest.approx(expected, abs=1e-6)


def test_pixel_metrics_sort_the_pixels_once(monkeypatch):
    """The cost of a test was one sort of every pixel per metric (nine of 6.5 million for 100 images at
    256 px); all five pixel metrics now read one sorted copy."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 40, 40, generator=generator)
    masks = (torch.rand(3, 40, 40, generator=generator) > 0.9).to(torch.uint8)
    full_size = maps.numel()
    sorts = []

    def counting(function):
        def wrapper(values, *args, **kwargs):
            if (values.numel() if torch.is_tensor(values) else np.size(values)) == full_size:
                sorts.append(function.__name__)
            return function(values, *args, **kwargs)
        return wrapper

    for module, name in ((np, "sort"), (np, "argsort"), (np, "unique"), (torch, "sort"), (torch, "argsort"),
                         (torch, "unique"), (torch, "_unique2")):
        monkeypatch.setattr(module, name, counting(getattr(module, name)))
    monkeypatch.setattr(torch.Tensor, "unique", lambda self, *a, **k: torch.unique(self, *a, **k))
    pixel_metrics(maps, masks)
    assert sorts == ["sort"]


def test_collector_drops_samples_repeated_by_a_padding_sampler():
    collector = ScoreCollector()
    ids = sample_ids(["a.png", "b.png", "c.png"])
    collector.update(torch.tensor([0.1, 0.9, 0.2]), torch.tensor([0, 1, 0]), ids)
    collector.update(torch.tensor([0.1]), torch.tensor([0]), ids[:1])  # the padded repeat of a.png
    scores, targets = collector.compute()
    pairs = sorted(zip(scores.tolist(), targets.tolist(), strict=True))
    assert pairs == [(pytest.approx(0.1), 0), (pytest.approx(0.2), 0), (pytest.approx(0.9), 1)]


def test_collector_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="non-finite"):
        ScoreCollector().update(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


def test_metric_bundles(random_scores):
    scores, target = random_scores
    assert set(image_metrics(scores, target)) == {"image_auroc", "image_ap", "image_f1_max", "image_fpr95"}
    assert image_metrics(scores, torch.zeros_like(target)) == {}
    maps = torch.rand(4, 8, 8)
    masks = (torch.rand(4, 8, 8) > 0.8).float()
    assert "pixel_aupro" in pixel_metrics(maps, masks)
