"""Pasting negative (out-of-distribution) content into normal images, with a per-pixel outlier label.

Two pieces:

- a *negative bank*: object-shaped regions cut from negative images, each stored as a square RGB crop
  plus its object mask. Sources: a folder of images with segment label maps in the ADE20K layout
  (``images/<split>/*.jpg`` with ``annotations/<split>/*.png``), or, offline, photographs shipped
  with scikit-image cut into regions by a scikit-image segmentation (Felzenszwalb or SLIC). An object
  is the union of two touching segments (the union of two classes, as DenseHybridAD pastes ADE20K
  objects). The bank is built once per spec and kept in memory; it is a pure function of its spec.
- :class:`NegativePaster`: a batched, device-side augmentation. Every image gets one negative at a
  random position, scale and flip, either as its object shape (``mask``) or as a rectangle of the
  crop (``rectangle``); alpha is hard, and the returned outlier map is exactly the pasted pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

import cv2
import numpy as np
import skimage.data
import skimage.segmentation
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.surfaces import PHOTOS_OUTSIDE_SURFACES, skimage_photo

SKIMAGE_SOURCE = "skimage"
Segmentation = Literal["felzenszwalb", "slic"]
PasteShape = Literal["mask", "rectangle", "mixed"]
PASTE_SHAPES: tuple[str, ...] = get_args(PasteShape)
# Longest side the negative images are segmented at.
WORKING_SIDE = 256


@dataclass
class NegativeBankSpec:
    """Where negative objects come from and how many are kept.

    Args:
        source: ``skimage`` (the offline default) or a folder in the ADE20K layout
            (``images/<split>/*.jpg`` and ``annotations/<split>/*.png`` label maps, class 0 = unlabelled).
        split: the ADE20K split folder name.
        segmentation: how the scikit-image photographs are cut into regions: ``felzenszwalb`` or ``slic``.
        size: number of objects in the bank.
        patch_size: side of the square crop each object is stored at.
        max_images: at most this many folder images are read (a seeded choice).
        min_area: smallest object area, as a fraction of its image.
        max_area: largest object area, as a fraction of its image.
        seed: seed of every choice; the bank is a pure function of this spec.
    """

    source: str = SKIMAGE_SOURCE
    split: str = "training"
    segmentation: Segmentation = "felzenszwalb"
    size: int = 256
    patch_size: int = 64
    max_images: int = 500
    min_area: float = 0.01
    max_area: float = 0.35
    seed: int = 0

    def __post_init__(self) -> None:
        if self.segmentation not in get_args(Segmentation):
            raise ValueError(f"negatives.segmentation must be felzenszwalb or slic, got {self.segmentation!r}")
        if self.size < 1 or self.patch_size < 8 or self.max_images < 1:
            raise ValueError(f"negatives needs size >= 1, patch_size >= 8 and max_images >= 1, got {self}")
        if not 0 < self.min_area < self.max_area <= 1:
            raise ValueError(f"negatives needs 0 < min_area < max_area <= 1, got {self.min_area}, {self.max_area}")


def _to_working_size(image: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    scale = WORKING_SIDE / max(image.shape[:2])
    if scale >= 1:
        return image, labels
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if labels is not None:
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    return image, labels


def segment(image: np.ndarray, method: Segmentation) -> np.ndarray:
    """Region labels [H, W] of an RGB image; regions of about 1-10 % of the image."""
    if method == "felzenszwalb":
        min_size = image.shape[0] * image.shape[1] // 100
        return skimage.segmentation.felzenszwalb(image, scale=300, sigma=0.8, min_size=min_size)
    return skimage.segmentation.slic(image, n_segments=40, compactness=10, start_label=0)


def _touching(labels: np.ndarray) -> dict[int, set[int]]:
    """For every region label, the labels it shares a horizontal or vertical border with."""
    pairs = np.concatenate([
        np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
        np.stack([labels[:-1].ravel(), labels[1:].ravel()], 1),
    ])
    pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)
    neighbours: dict[int, set[int]] = {}
    for a, b in pairs.tolist():
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    return neighbours


def _square_crop(image: np.ndarray, region: np.ndarray, patch_size: int) -> np.ndarray:
    """The region's bounding box, padded to a square around its centre, as [4, P, P] uint8 (RGB + mask)."""
    rows, cols = np.nonzero(region)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left)
    cy, cx = (top + bottom) // 2, (left + right) // 2
    top, left = cy - side // 2, cx - side // 2
    pad = side  # enough for any square that leaves the image
    image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    region = np.pad(region.astype(np.uint8), pad)
    window = (slice(top + pad, top + pad + side), slice(left + pad, left + pad + side))
    rgb = cv2.resize(image[window], (patch_size, patch_size), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(region[window], (patch_size, patch_size), interpolation=cv2.INTER_NEAREST)
    return np.concatenate([rgb, mask[..., None] * 255], axis=2).transpose(2, 0, 1)


def cut_objects(image: np.ndarray, labels: np.ndarray, count: int, spec: NegativeBankSpec,
                rng: np.random.Generator, ignore_label: int | None = None) -> list[np.ndarray]:
    """Up to ``count`` objects, each the union of two touching labelled regions, as [4, P, P] uint8."""
    area = labels.size
    neighbours = _touching(labels)
    ids, sizes = np.unique(labels, return_counts=True)
    size_of = dict(zip(ids.tolist(), sizes.tolist(), strict=True))
    candidates = [i for i in ids.tolist() if i != ignore_label and size_of[i] < spec.max_area * area]
    objects: list[np.ndarray] = []
    for _ in range(8 * count):
        if len(objects) == count or not candidates:
            break
        first = int(rng.choice(candidates))
        partners = sorted(n for n in neighbours.get(first, ()) if n != ignore_label)
        second = int(rng.choice(partners)) if partners else first
        region = (labels == first) | (labels == second)
        if spec.min_area * area <= region.sum() <= spec.max_area * area:
            objects.append(_square_crop(image, region, spec.patch_size))
    return objects


def _skimage_sources(spec: NegativeBankSpec):
    for name in PHOTOS_OUTSIDE_SURFACES:
        image, _ = _to_working_size(skimage_photo(name))
        yield image, segment(image, spec.segmentation), None


def _ade20k_sources(spec: NegativeBankSpec, rng: np.random.Generator):
    root = Path(spec.source).expanduser()
    images_dir, labels_dir = root / "images" / spec.split, root / "annotations" / spec.split
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise FileNotFoundError(
            f"negatives.source={spec.source!r}: expected the ADE20K layout {images_dir} and {labels_dir} "
            f"(images and their segment label maps), or source: {SKIMAGE_SOURCE} for the offline default"
        )
    pairs = [(p, labels_dir / f"{p.stem}.png") for p in sorted(images_dir.glob("*.jpg"))]
    pairs = [(image, label) for image, label in pairs if label.is_file()]
    if not pairs:
        raise FileNotFoundError(f"negatives.source={spec.source!r}: no image in {images_dir} has a label map "
                                f"<stem>.png in {labels_dir}")
    for index in rng.permutation(len(pairs))[: spec.max_images]:
        image_path, label_path = pairs[index]
        bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        labels = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        if bgr is None or labels is None or labels.shape[:2] != bgr.shape[:2]:
            raise ValueError(f"negatives: {image_path} or its label map {label_path} is unreadable or of "
                             f"another size")
        labels = labels if labels.ndim == 2 else labels[..., 0]
        image, labels = _to_working_size(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), labels)
        yield image, labels.astype(np.int64), 0  # class 0 is "unlabelled" in ADE20K


@lru_cache(maxsize=4)
def _build_bank(key: tuple) -> torch.Tensor:
    spec = NegativeBankSpec(*key)
    rng = np.random.default_rng(spec.seed)
    is_skimage = spec.source == SKIMAGE_SOURCE
    sources = list(_skimage_sources(spec) if is_skimage else _ade20k_sources(spec, rng))
    per_image = 2 * -(-spec.size // len(sources))  # some images hold fewer objects of a usable size
    objects = []
    for image, labels, ignore in sources:
        objects += cut_objects(image, labels, per_image, spec, rng, ignore)
    if not objects:
        raise ValueError(f"negatives: no region of {spec.source!r} has an area in [{spec.min_area}, "
                         f"{spec.max_area}] of its image; widen min_area/max_area")
    chosen = rng.permutation(len(objects))[: spec.size]
    return torch.from_numpy(np.stack([objects[i] for i in chosen]))


def negative_bank(spec: NegativeBankSpec) -> torch.Tensor:
    """The bank of ``spec``: uint8 [N, 4, P, P], RGB and object mask (0/255). Built once per spec."""
    return _build_bank(dataclasses.astuple(spec))


def paste_sides(image_size: int, reference_size: int = 256, min_side: int = 16, step: int = 8,
                max_fraction: float = 0.5) -> torch.Tensor:
    """The side lengths a paste may take: ``min_side`` px and up in steps of ``step`` px at
    ``reference_size``, scaled with the image for smaller images, up to ``max_fraction`` of its side."""
    scale = min(1.0, image_size / reference_size)
    low, stride = max(2, round(min_side * scale)), max(1, round(step * scale))
    high = max(low, int(image_size * max_fraction))
    return torch.arange(low, high + 1, stride)


class NegativePaster(nn.Module):
    """Pastes one negative from the bank into each image (device-side, batched, hard alpha).

    Args:
        bank: uint8 [N, 4, P, P] from :func:`negative_bank`.
        shape: ``mask`` (the object's shape), ``rectangle`` (an axis-aligned rectangle of the crop, sides
            drawn independently) or ``mixed`` (each image one or the other with probability 0.5).
        probability: chance that an image receives a paste.
        reference_size, min_side, step, max_fraction: the paste sizes, see :func:`paste_sides`.
    """

    def __init__(self, bank: torch.Tensor, shape: PasteShape = "mask", probability: float = 1.0,
                 reference_size: int = 256, min_side: int = 16, step: int = 8, max_fraction: float = 0.5) -> None:
        super().__init__()
        if shape not in PASTE_SHAPES:
            raise ValueError(f"paste shape must be one of {', '.join(PASTE_SHAPES)}, got {shape!r}")
        if not 0 <= probability <= 1:
            raise ValueError(f"paste probability must be in [0, 1], got {probability}")
        if bank.dtype != torch.uint8 or bank.ndim != 4 or bank.shape[1] != 4:
            raise ValueError(f"bank must be uint8 [N, 4, P, P], got {bank.dtype} {tuple(bank.shape)}")
        self.shape = shape
        self.probability = probability
        self.size_rule = {"reference_size": reference_size, "min_side": min_side, "step": step,
                          "max_fraction": max_fraction}
        # Not in checkpoints: the bank is rebuilt from its spec.
        self.register_buffer("bank", bank, persistent=False)

    def _uniform(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.rand(count, device=self.bank.device, generator=generator)

    def _pick(self, options: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
        return options.to(self.bank.device)[(self._uniform(count, generator) * len(options)).long()]

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (images with pastes, outlier map [B, H, W] bool: exactly the pasted pixels)."""
        batch, _, height, width = images.shape
        device = images.device
        crops = self.bank[(self._uniform(batch, generator) * len(self.bank)).long()].float() / 255
        as_rectangle = {"mask": torch.zeros(batch, dtype=torch.bool, device=device),
                        "rectangle": torch.ones(batch, dtype=torch.bool, device=device),
                        "mixed": self._uniform(batch, generator) < 0.5}[self.shape]
        # A rectangle draws its sides independently; an object keeps its aspect ratio in a square box.
        square = self._pick(paste_sides(min(height, width), **self.size_rule), batch, generator)
        box_h = torch.where(as_rectangle, self._pick(paste_sides(height, **self.size_rule), batch, generator), square)
        box_w = torch.where(as_rectangle, self._pick(paste_sides(width, **self.size_rule), batch, generator), square)
        top = (self._uniform(batch, generator) * (height - box_h + 1)).long()
        left = (self._uniform(batch, generator) * (width - box_w + 1)).long()
        flip = torch.where(self._uniform(batch, generator) < 0.5, -1.0, 1.0)
        # Affine map from output coordinates (normalised, align_corners=False) into the crop's [-1, 1]^2.
        scale_x, scale_y = width / box_w, height / box_h
        centre_x = (2 * left + box_w) / width - 1
        centre_y = (2 * top + box_h) / height - 1
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = flip * scale_x, -flip * scale_x * centre_x
        theta[:, 1, 1], theta[:, 1, 2] = scale_y, -scale_y * centre_y
        grid = F.affine_grid(theta, [batch, 4, height, width], align_corners=False)
        content = F.grid_sample(crops[:, :3], grid, mode="bilinear", padding_mode="border", align_corners=False)
        shape = F.grid_sample(crops[:, 3:], grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
        rows = torch.arange(height, device=device).view(1, -1, 1)
        cols = torch.arange(width, device=device).view(1, 1, -1)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
                  & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1)))
        pasted = inside & (as_rectangle.view(-1, 1, 1) | (shape > 0.5))
        pasted &= (self._uniform(batch, generator) < self.probability).view(-1, 1, 1)
        return torch.where(pasted[:, None], content.to(images.dtype), images), pasted
