"""Domain shifts: fixed, deterministic image transforms that turn one domain into another.

A shift maps an RGB uint8 image ``[H, W, 3]`` to another RGB uint8 image of the same size. Every image
of a domain goes through the same shift with the same parameters, masks are never touched, and two
passes over the same image give identical pixels.

Available shifts (paper 001 section 4.1, with weight-free stand-ins for its two WCT2 style transfers):

- ``none``: identity.
- ``gray``: ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), replicated to 3 channels.
- ``brg``: the fixed channel permutation RGB -> BRG.
- ``coljit``: RGB -> HSV, hue x ``COLJIT_FACTORS[0]`` (wrapped on the colour circle), saturation x
  ``COLJIT_FACTORS[1]`` and value x ``COLJIT_FACTORS[2]`` (both clipped to [0, 1]), back to RGB.
- ``fda``: Fourier domain adaptation (Yang & Soatto, CVPR 2020): the low-frequency amplitude spectrum
  (a centred window of half-width ``FDA_BETA`` x the image side) is replaced by that of one style
  photograph; the phase is kept.
- ``histmatch``: per-channel histogram matching to one style photograph.
- ``pda``: pixel-distribution adaptation (PCA whitening/colouring of pixel colours) to one style photograph.

The style shifts are honest weight-free stand-ins for WCT2 style transfer, not WCT2 itself. Their
default style photographs ship with scikit-image (``STYLE_PHOTOS``); ``reference`` overrides them.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import skimage.data

SHIFT_NAMES = ("none", "gray", "brg", "coljit", "fda", "histmatch", "pda")
STYLE_SHIFTS = ("fda", "histmatch", "pda")

# Hue, saturation, value factors of ``coljit``: hue x1.6 (green turns cyan, blue wraps round to red),
# saturation halved, value x0.75 (duller, darker colours).
COLJIT_FACTORS = (1.6, 0.5, 0.75)
# Half-width of the swapped low-frequency window as a fraction of the image side (FDA's range: 0.01-0.09).
FDA_BETA = 0.09
# Default style photograph (a scikit-image data function) of each style shift.
STYLE_PHOTOS = {"fda": "coffee", "histmatch": "astronaut", "pda": "chelsea"}

# BRG output channel c takes input channel BRG_ORDER[c].
BRG_ORDER = (2, 0, 1)


def check_shift_name(name: str | None) -> str:
    """Return the canonical shift name (``None`` means ``"none"``); raise ValueError for unknown names."""
    canonical = "none" if name is None else name
    if canonical not in SHIFT_NAMES:
        raise ValueError(f"unknown shift {name!r}; valid shifts are: {', '.join(SHIFT_NAMES)}")
    return canonical


def load_style_reference(shift: str, reference: str | None = None) -> np.ndarray:
    """RGB uint8 style photograph of a style shift: the image at path ``reference``, else the default."""
    if reference is None:
        image = getattr(skimage.data, STYLE_PHOTOS[shift])()
    else:
        path = Path(reference)
        if not path.is_file():
            raise FileNotFoundError(f"style reference image for shift {shift!r} not found: {path}")
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"style reference image for shift {shift!r} cannot be read: {path}")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


class Shift:
    """A named, deterministic domain shift; call it on an RGB uint8 image ``[H, W, 3]``.

    Picklable, so DataLoader workers can carry it.

    Args:
        name: one of ``SHIFT_NAMES`` (``None`` is ``"none"``).
        reference: path of the style photograph for ``fda``/``histmatch``/``pda``; ``None`` uses the
            scikit-image photograph in ``STYLE_PHOTOS``. Ignored by the other shifts.
    """

    def __init__(self, name: str | None, reference: str | None = None) -> None:
        self.name = check_shift_name(name)
        self.reference_path = reference if self.name in STYLE_SHIFTS else None
        self._style: np.ndarray | None = None
        self._transform: A.BasicTransform | None = None
        # Degenerate ranges with p=1: albumentations then draws the same parameters on every call.
        if self.name == "gray":
            self._transform = A.ToGray(num_output_channels=3, method="weighted_average", p=1.0)
        elif self.name == "fda":
            self._transform = A.FDA(beta_limit=(FDA_BETA, FDA_BETA), p=1.0)
        elif self.name == "histmatch":
            self._transform = A.HistogramMatching(blend_ratio=(1.0, 1.0), p=1.0)
        elif self.name == "pda":
            self._transform = A.PixelDistributionAdaptation(blend_ratio=(1.0, 1.0), transform_type="pca", p=1.0)
        if self.name in STYLE_SHIFTS:
            self._style = load_style_reference(self.name, reference)

    def __repr__(self) -> str:
        return f"Shift({self.name!r}, reference={self.reference_path!r})"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"shift {self.name!r} expects an RGB uint8 image [H,W,3], got "
                             f"{image.dtype} {image.shape}")
        if self.name == "none":
            return image
        if self.name == "brg":
            return np.ascontiguousarray(image[..., BRG_ORDER])
        if self.name == "coljit":
            return _scale_hsv(image, COLJIT_FACTORS)
        if self.name == "gray":
            return self._transform(image=image)["image"]
        if self.name == "pda":
            # albumentations 2.0.8's PDA returns [0, 1] values for uint8 input (black images); run it on floats.
            as_float = self._transform(image=image.astype(np.float32) / 255.0,
                                       pda_metadata=[self._style.astype(np.float32) / 255.0])["image"]
            return np.clip(np.rint(as_float * 255.0), 0, 255).astype(np.uint8)
        return self._transform(image=image, **{self._transform.metadata_key: [self._style]})["image"]


def _scale_hsv(image: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    hsv = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)  # H in [0, 360), S, V in [0, 1]
    hsv[..., 0] = np.mod(hsv[..., 0] * factors[0], 360.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * factors[1], 0.0, 1.0)
    hsv[..., 2] = np.clip(hsv[..., 2] * factors[2], 0.0, 1.0)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
