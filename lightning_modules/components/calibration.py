"""Decision thresholds and score normalisation, fitted without test images and stored in every checkpoint.

A detector's raw scores (Mahalanobis distances, NLLs, energies) are unbounded. :class:`ScoreCalibration`
holds, for image scores and for anomaly-map pixels separately, a decision threshold and the bounds of a
normalisation that maps scores monotonically to [0, 1] with the threshold at 0.5. It is a child module of
every detector and classifier, so the values travel in the ``state_dict`` of each checkpoint. The metrics
never use it: they rank raw scores.

How thresholds are fitted (``ThresholdSpec``):

- ``quantile``: the ``quantile`` of the scores of held-out NORMAL images (source validation split), and of
  their pixels for the map threshold. Needs no defect image.
- ``f1_adaptive``: the threshold of maximal F1 on labelled validation data with defects (the classifiers'
  labelled source validation split); the pixel threshold likewise where masks exist, else the quantile of
  normal pixels. An error where the validation data has no defects.
- ``manual``: ``image_threshold`` (and optionally ``pixel_threshold``) as given.
- ``calibrate_on: target_shots``: at test/predict start the fitted thresholds move to the target, from k
  unlabelled target normals as they are (see :meth:`ScoreCalibration.shift_to_target`).

Normalisation bounds: ``low`` = threshold − spread and ``high`` = threshold + spread, with spread the distance
from the threshold down to the lowest held-out normal score (|threshold| where there is none: one normal image,
or a manual threshold without data). A normal score lands in [0, 0.5], a score as far above the threshold as
the normals reach below it lands at 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from lightning_modules.components.metrics import ScoreCollector, sample_ids
from lightning_modules.components.specs import spec_from

Method = Literal["quantile", "f1_adaptive", "manual"]
CalibrateOn = Literal["source", "target_shots"]
METHODS: tuple[str, ...] = get_args(Method)
CALIBRATE_ON: tuple[str, ...] = get_args(CalibrateOn)

#: pixels of one image kept for the pixel threshold: a fixed subsample, drawn from the image's sample id
PIXELS_PER_IMAGE = 4096
#: normal pixels the pixel quantile is computed on at most (a deterministic subsample beyond)
MAX_PIXELS = 2**22

_THRESHOLD_KEY = "model.init_args.threshold"


@dataclass
class ThresholdSpec:
    """How the decision thresholds are fitted (init arg ``threshold`` of every detector and classifier).

    Args:
        method: ``quantile`` (of held-out normal scores; default), ``f1_adaptive`` (needs labelled validation
            defects) or ``manual``.
        quantile: quantile of the held-out normal image scores and normal pixels, in (0, 1).
        image_threshold: ``manual``: the image-score threshold (raw score units); ignored by the other methods.
        pixel_threshold: ``manual``: the anomaly-map threshold (raw units); unset: fitted as by ``quantile``.
        calibrate_on: ``source`` (the source validation split) or ``target_shots`` (at test/predict start the
            thresholds move to the DataModule's k unlabelled target shots).
    """

    method: Method = "quantile"
    quantile: float = 0.99
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    calibrate_on: CalibrateOn = "source"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"{_THRESHOLD_KEY}.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.calibrate_on not in CALIBRATE_ON:
            raise ValueError(f"{_THRESHOLD_KEY}.calibrate_on must be one of {', '.join(CALIBRATE_ON)}, "
                             f"got {self.calibrate_on!r}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"{_THRESHOLD_KEY}.quantile must be in (0, 1), got {self.quantile}")
        if self.method == "manual" and self.image_threshold is None:
            raise ValueError(f"{_THRESHOLD_KEY}.method manual needs {_THRESHOLD_KEY}.image_threshold (and "
                             f"optionally pixel_threshold), in the detector's raw score units")
        for name in ("image_threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{_THRESHOLD_KEY}.{name} must be a finite number, got {value}")


def as_threshold_spec(value: ThresholdSpec | dict | None) -> ThresholdSpec:
    return ThresholdSpec() if value is None else spec_from(value, ThresholdSpec, _THRESHOLD_KEY)


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default), in float64 and without
    ``torch.quantile``'s input-size limit."""
    if values.numel() == 0:
        raise ValueError("a quantile of no values")
    return float(np.quantile(values.detach().double().cpu().numpy().ravel(), q))


def f1_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold t of maximal F1 for the decision ``score > t``: midway between the lowest score called
    defective and the next lower score."""
    scores, labels = scores.detach().double().cpu().flatten(), labels.detach().cpu().flatten().bool()
    order = torch.argsort(scores, descending=True)
    scores, labels = scores[order], labels[order]
    true_positives = torch.cumsum(labels.double(), 0)
    predicted = torch.arange(1, scores.numel() + 1, dtype=torch.double)
    # Only the last position of a run of equal scores is a threshold one can set.
    last_of_tie = torch.ones_like(labels)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    f1 = 2 * true_positives / (predicted + labels.sum())
    f1[~last_of_tie] = -1
    best = int(torch.argmax(f1))
    lowest_defective = float(scores[best])
    below = scores[best + 1:]
    if below.numel() == 0:  # every sample called defective
        return lowest_defective - max(abs(lowest_defective), 1.0) * 1e-6
    return (lowest_defective + float(below[0])) / 2


def _spread(threshold: float, lowest: float | None) -> float:
    """Distance from the threshold down to the lowest normal score; where that is not positive (one normal
    image, or a manual threshold below the normals) |threshold| (1 at 0), so that the bounds differ."""
    if lowest is not None and threshold - lowest > 0:
        return threshold - lowest
    return max(abs(threshold), 1.0)


#: what the thresholds were fitted by, and on which domain (stored as indices into these)
FITTED_BY = ("unfitted", *METHODS)
DOMAINS = ("none", "source", "target", "manual")


class ScoreCalibration(torch.nn.Module):
    """Image and pixel thresholds with their normalisation bounds, as buffers (so in every checkpoint).

    ``center`` is the median of the held-out normal scores the thresholds were fitted on, the reference point
    of :meth:`shift_to_target`. Every buffer is a finite tensor (flags and indices, no NaN and no extra state),
    so checkpoints stay plain tensors that the non-finite guard and state comparisons read like any other. A
    checkpoint written before calibration existed loads unfitted.
    """

    #: buffers: (image, pixel) × (threshold, low, high, center)
    BUFFERS = tuple(f"{kind}_{name}" for kind in ("image", "pixel") for name in ("threshold", "low", "high", "center"))
    #: their defaults: 0 and not fitted
    STATE = {**dict.fromkeys(BUFFERS, 0.0), "image_fitted": False, "pixel_fitted": False, "method_index": 0,
             "domain_index": 0, "sample_count": 0, "fitted_quantile": 0.0}

    def __init__(self) -> None:
        super().__init__()
        for name, default in self.STATE.items():
            self.register_buffer(name, torch.tensor(default, dtype=torch.float64 if name == "fitted_quantile" else None))

    # ------------------------------------------------------------------------------------------ state

    @property
    def is_fitted(self) -> bool:
        """The image threshold is set (fitted or manual)."""
        return bool(self.image_fitted)

    @property
    def has_pixel_threshold(self) -> bool:
        return bool(self.pixel_fitted)

    @property
    def method(self) -> str:
        return FITTED_BY[int(self.method_index)]

    @method.setter
    def method(self, value: str) -> None:
        self.method_index.fill_(FITTED_BY.index(value))

    @property
    def domain(self) -> str:
        """Which domain the thresholds were calibrated on: none, source, target or manual."""
        return DOMAINS[int(self.domain_index)]

    @domain.setter
    def domain(self, value: str) -> None:
        self.domain_index.fill_(DOMAINS.index(value))

    @property
    def samples(self) -> int:
        return int(self.sample_count)

    @samples.setter
    def samples(self, value: int) -> None:
        self.sample_count.fill_(int(value))

    @property
    def quantile(self) -> float | None:
        """The quantile a ``quantile`` fit used (None for the other methods)."""
        return float(self.fitted_quantile) if self.method == "quantile" else None

    @quantile.setter
    def quantile(self, value: float | None) -> None:
        self.fitted_quantile.fill_(0.0 if value is None else value)

    def matches(self, spec: ThresholdSpec) -> bool:
        """Whether the stored thresholds were fitted the way ``spec`` asks (manual ones are set, not fitted)."""
        if not self.is_fitted or spec.method == "manual":
            return spec.method == "manual"
        return self.method == spec.method and (spec.method != "quantile" or abs(self.quantile - spec.quantile) < 1e-9)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint from before calibration: unfitted, instead of missing keys.
        for name, default in self.STATE.items():
            state_dict.setdefault(prefix + name, torch.tensor(default))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _set(self, kind: str, threshold: float, low: float, high: float, center: float) -> None:
        for name, value in (("threshold", threshold), ("low", low), ("high", high), ("center", center)):
            getattr(self, f"{kind}_{name}").fill_(value)
        getattr(self, f"{kind}_fitted").fill_(True)

    def reset(self) -> None:
        for name, default in self.STATE.items():
            getattr(self, name).fill_(default)

    # ------------------------------------------------------------------------------------------ fitting

    def fit(self, spec: ThresholdSpec, scores: torch.Tensor, labels: torch.Tensor,
            pixels: torch.Tensor | None = None, pixel_labels: torch.Tensor | None = None,
            domain: str = "source", where: str = "the validation split") -> None:
        """Fits both thresholds from held-out scores: image ``scores`` [N] with ``labels`` [N] (0 normal,
        1 defect) and optionally pixel values [M] with their labels [M]. ``where`` names the data in errors."""
        scores, labels = scores.detach().double().cpu().flatten(), labels.detach().cpu().flatten()
        normal = scores[labels == 0]
        if normal.numel() == 0:
            raise ValueError(f"thresholds: {where} has no normal image to calibrate on")
        if spec.method == "f1_adaptive":
            if not (labels == 1).any():
                raise ValueError(
                    f"{_THRESHOLD_KEY}.method f1_adaptive needs labelled defects in {where}, which has normal "
                    f"images only; use {_THRESHOLD_KEY}.method quantile (no defect images needed) or manual")
            image_threshold = f1_threshold(scores, labels == 1)
        elif spec.method == "manual":
            image_threshold = float(spec.image_threshold)
        else:
            image_threshold = quantile(normal, spec.quantile)
        center = float(normal.median())
        spread = _spread(image_threshold, float(normal.min()))
        self._set("image", image_threshold, image_threshold - spread, image_threshold + spread, center)
        self.pixel_fitted.fill_(False)
        if pixels is not None and pixels.numel():
            self._fit_pixels(spec, pixels, pixel_labels)
        elif spec.method == "manual" and spec.pixel_threshold is not None:
            self.set_manual_pixel(spec.pixel_threshold)
        self.method = spec.method
        self.domain = "manual" if spec.method == "manual" else domain
        self.samples = int(scores.numel())
        self.quantile = spec.quantile if spec.method == "quantile" else None

    def _fit_pixels(self, spec: ThresholdSpec, pixels: torch.Tensor, pixel_labels: torch.Tensor) -> None:
        pixels, pixel_labels = pixels.detach().double().cpu().flatten(), pixel_labels.detach().cpu().flatten()
        normal = pixels[pixel_labels == 0]
        if normal.numel() > MAX_PIXELS:  # an even stride keeps the subsample deterministic
            normal = normal[torch.linspace(0, normal.numel() - 1, MAX_PIXELS).long()]
        if spec.method == "manual" and spec.pixel_threshold is not None:
            threshold = float(spec.pixel_threshold)
        elif spec.method == "f1_adaptive" and (pixel_labels == 1).any():
            threshold = f1_threshold(pixels, pixel_labels == 1)
        else:  # f1_adaptive without masks: the quantile of normal pixels
            threshold = quantile(normal, spec.quantile)
        spread = _spread(threshold, float(normal.min()) if normal.numel() else None)
        self._set("pixel", threshold, threshold - spread, threshold + spread,
                  float(normal.median()) if normal.numel() else threshold)

    def set_manual(self, spec: ThresholdSpec) -> None:
        """``method: manual`` without data: the given thresholds. The normalisation's lower bound stays the
        fitted calibration's lowest normal score when there is one below the threshold; otherwise it spans
        threshold ± |threshold| (± 1 at 0)."""
        self._set_manual_kind("image", float(spec.image_threshold))
        if spec.pixel_threshold is not None:
            self.set_manual_pixel(spec.pixel_threshold)
        self.method, self.domain = "manual", "manual"

    def set_manual_pixel(self, threshold: float) -> None:
        self._set_manual_kind("pixel", float(threshold))

    def _set_manual_kind(self, kind: str, threshold: float) -> None:
        fitted = bool(getattr(self, f"{kind}_fitted"))
        low, center = float(getattr(self, f"{kind}_low")), float(getattr(self, f"{kind}_center"))
        spread = _spread(threshold, low if fitted else None)
        self._set(kind, threshold, threshold - spread, threshold + spread, center if fitted else threshold - spread / 2)

    def shift_to_target(self, image_scores: torch.Tensor, pixels: torch.Tensor | None, samples: int) -> None:
        """Moves the fitted calibration to the target: every value (threshold, bounds, center) is shifted by
        the median of the target normals' scores minus the median of the source normals' scores.

        The rule needs no target label and is defined at k = 1 (one shot's score is its median): a shift of the
        score distribution between lines moves the threshold with it, while the width of the normal
        distribution, which k shots cannot estimate well, stays the source's. The shots are scored as they are,
        without the square's symmetries: on the embedded brick pair, PaDiM scored the quarter-turned views of
        10 line-B shots 174-229 against 101-150 unturned (its Gaussians are per position), so views would move
        the threshold by what the rotation does, not by the line.
        """
        if not self.is_fitted:
            raise ValueError("target_shots recalibration needs fitted source thresholds")
        for kind, values in (("image", image_scores), ("pixel", pixels)):
            center = getattr(self, f"{kind}_center")
            if values is None or values.numel() == 0 or not getattr(self, f"{kind}_fitted"):
                continue
            offset = float(values.detach().double().median()) - float(center)
            for name in ("threshold", "low", "high", "center"):
                getattr(self, f"{kind}_{name}").add_(offset)
        self.domain = "target"
        self.samples = int(samples)

    # ------------------------------------------------------------------------------------------ use

    @staticmethod
    def _normalise(values: torch.Tensor, low: torch.Tensor, threshold: torch.Tensor,
                   high: torch.Tensor) -> torch.Tensor:
        # Two clamped ramps: [low, threshold] -> [0, 0.5] and [threshold, high] -> [0.5, 1]. Only
        # sub/div/clamp/mul/add, so the export graphs keep it.
        values = values.float()
        below = ((values - low) / (threshold - low)).clamp(0.0, 1.0)
        above = ((values - threshold) / (high - threshold)).clamp(0.0, 1.0)
        return 0.5 * below + 0.5 * above

    def normalise_image(self, scores: torch.Tensor) -> torch.Tensor:
        return self._normalise(scores, self.image_low, self.image_threshold, self.image_high)

    def normalise_pixel(self, maps: torch.Tensor) -> torch.Tensor:
        return self._normalise(maps, self.pixel_low, self.pixel_threshold, self.pixel_high)

    def summary(self) -> dict:
        """Plain values for logs, ``predictions.csv`` and ``model.json`` (None where not fitted)."""
        values = {name: float(getattr(self, name)) if getattr(self, f"{name.split('_')[0]}_fitted") else None
                  for name in self.BUFFERS}
        return {**values, "method": self.method, "quantile": self.quantile, "domain": self.domain,
                "samples": int(self.samples)}


def prediction(batch: dict, scores: torch.Tensor, maps: torch.Tensor | None, calibration: ScoreCalibration) -> dict:
    """The ``predict_step`` output every method returns (the prediction writer's input)."""
    scores = scores.detach().float()
    normalised_map = predicted_mask = None
    if maps is not None:
        maps = maps.detach().float()
        if calibration.has_pixel_threshold:
            normalised_map = calibration.normalise_pixel(maps).cpu()
            predicted_mask = normalised_map > 0.5
        maps = maps.cpu()
    return {
        "path": list(batch["path"]),
        "image": batch["image"].detach().float().cpu(),
        "score": scores.cpu(),
        "normalised_score": calibration.normalise_image(scores).cpu(),
        "decision": (scores > calibration.image_threshold).cpu(),
        "anomaly_map": maps,
        "normalised_map": normalised_map,
        "predicted_mask": predicted_mask,
        "calibration": calibration.summary(),
    }


def sample_pixels(maps: torch.Tensor, masks: torch.Tensor, ids: torch.Tensor,
                  per_image: int = PIXELS_PER_IMAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subsample of each map's pixels and their mask labels: [B, P] each, P = min(h·w, ``per_image``).

    The positions are drawn from the image's sample id, so an image gives the same pixels in any batch and on
    any number of processes."""
    flat_maps, flat_masks = maps.flatten(1), masks.flatten(1)
    count = flat_maps.shape[1]
    if count <= per_image:
        return flat_maps, flat_masks
    rows = []
    for sample_id in ids.tolist():
        generator = torch.Generator().manual_seed(int(sample_id))
        rows.append(torch.randperm(count, generator=generator)[:per_image])
    positions = torch.stack(rows).to(maps.device)
    return flat_maps.gather(1, positions), flat_masks.gather(1, positions)


class HeldOutScores(torch.nn.Module):
    """Scores of held-out labelled images (and a pixel subsample of their maps), gathered across processes,
    from which :class:`ScoreCalibration` is fitted."""

    def __init__(self) -> None:
        super().__init__()
        self.images = ScoreCollector()
        self.pixels = ScoreCollector()

    def reset(self) -> None:
        self.images.reset()
        self.pixels.reset()

    @property
    def empty(self) -> bool:
        return self.images.update_count == 0

    def update(self, batch: dict, scores: torch.Tensor, maps: torch.Tensor | None = None) -> None:
        """One batch of the sample contract (``label``, ``path``; ``mask``/``has_mask`` for maps)."""
        labels = batch["label"]
        ids = sample_ids(batch["path"]).to(scores.device)
        self.images.update(scores, labels, ids)
        if maps is None:
            return
        masks = batch["mask"][:, 0]
        if maps.shape[-2:] != masks.shape[-2:]:
            maps = torch.nn.functional.interpolate(maps[:, None].float(), size=masks.shape[-2:], mode="bilinear",
                                                   align_corners=False)[:, 0]
        # Pixel labels are known where a mask exists, and everywhere in a normal image.
        known = batch["has_mask"].bool().to(labels.device) | (labels == 0)
        if not known.any():
            return
        known = known.to(maps.device)
        pixels, pixel_labels = sample_pixels(maps[known].detach(), masks.to(maps.device)[known], ids[known])
        self.pixels.update(pixels, pixel_labels, ids[known])

    def fit(self, calibration: ScoreCalibration, spec: ThresholdSpec, domain: str, where: str) -> None:
        scores, labels = self.images.compute()
        pixels = pixel_labels = None
        if self.pixels.update_count:
            pixels, pixel_labels = self.pixels.compute()
        calibration.fit(spec, scores, labels, pixels, pixel_labels, domain, where)
