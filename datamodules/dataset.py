"""Torch datasets over lists of ``Sample``: image loading, resizing, domain shift, the sample dict.

Every item is a dict that the default collate batches:

- ``image``: float32 ``[3, H, W]`` in [0, 1], NOT normalised. The model's feature extractor
  (``lightning_modules.components.backbone.FeatureExtractor``) normalises with its weights' own mean/std.
- ``label``: int, 0 normal, 1 anomalous (-1 where labels are hidden, see ``AnomalyDataset``).
- ``mask``: float32 ``[1, H, W]`` in {0, 1}; all zeros for normals and where no mask exists.
- ``has_mask``: bool, False when the dataset has no pixel ground truth for this sample.
- ``defect_type``: str, ``"good"`` for normals.
- ``domain``: str, the category/domain name; ``domain_index``: int, its index in the domain list.
- ``path``: str, the image file.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.readers import Sample
from datamodules.shifts import Shift
from datamodules.splits import rng_for

UNLABELLED = -1
_WARNED_EMPTY_MASKS: set[str] = set()  # mask files already warned about as empty (per process)


def read_image(path: str) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``; grayscale files are replicated to 3 channels."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {path!r}: missing, corrupt or not an image file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_mask(path: str, image_path: str, image_shape: tuple[int, int], defect: bool = False) -> np.ndarray:
    """Binary uint8 mask ``[H, W]``, checked to be the image's size.

    The file is read in its own bit depth (8- or 16-bit, float TIFF), so a 16-bit 0/1 mask keeps its
    defect pixels; a pixel is a defect where any colour channel is > 0 (an alpha channel is ignored).
    A ``defect`` image whose mask has no defect pixel is warned about once per file.
    """
    mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"cannot read mask {path!r}: missing, corrupt or not an image file")
    if mask.ndim == 3:
        # BGR(A) or gray + alpha: the colour channels carry the mask, alpha is usually opaque everywhere
        colour = mask[..., :3] if mask.shape[2] >= 3 else mask[..., :1]
        mask = colour.max(axis=2)
    if mask.shape != image_shape:
        raise ValueError(f"mask {path!r} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path!r} "
                         f"is {image_shape[1]}x{image_shape[0]}; a mask must have its image's size")
    binary = (mask > 0).astype(np.uint8)
    if defect and not binary.any() and path not in _WARNED_EMPTY_MASKS:
        _WARNED_EMPTY_MASKS.add(path)
        warnings.warn(f"mask {path!r} of defect image {image_path!r} has no pixel > 0 ({mask.dtype}, "
                      f"{mask.shape[1]}x{mask.shape[0]}): its pixel metrics count no defect there", stacklevel=2)
    return binary


def build_resize(image_size: int, resize_size: int | None = None) -> A.Compose:
    """Resize image and mask together (mask nearest) to ``image_size``, or to ``resize_size`` and then
    centre-crop ``image_size``."""
    if resize_size is None:
        steps = [A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_NEAREST)]
    else:
        if resize_size < image_size:
            raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size} to centre-crop")
        steps = [A.Resize(resize_size, resize_size, interpolation=cv2.INTER_AREA,
                          mask_interpolation=cv2.INTER_NEAREST),
                 A.CenterCrop(image_size, image_size)]
    return A.Compose(steps)


def square_symmetry(array: np.ndarray, symmetry: int) -> np.ndarray:
    """Symmetry 0-7 of the square: ``symmetry % 4`` quarter-turns, then a left-right mirror if >= 4."""
    turned = np.rot90(array, symmetry % 4, axes=(0, 1))
    return turned[:, ::-1] if symmetry >= 4 else turned


class AnomalyDataset(Dataset):
    """Samples loaded from disk, resized, passed through one domain ``shift``, returned as the sample dict.

    Args:
        samples: the images and their annotations.
        domains: the DataModule's domain list; ``domain_index`` is a sample's domain's index in it.
        shift: the domain shift applied to every image (never to masks), or one shift per domain name.
        image_size: side of the square output.
        resize_size: if set, resize to this side first and centre-crop ``image_size``.
        hide_labels: return label -1, an empty mask, has_mask False and defect_type "unlabelled", for
            unlabelled target data in domain adaptation.
        symmetry_seed: if set, training augmentation: each item gets one of the 8 symmetries of the square
            (quarter-turns, with or without a mirror), image and mask alike, drawn from (seed, key). Keys
            are ``epoch * len + index`` (``ResumableSampler(epoch_keys=True)``), so every epoch draws
            afresh and a resumed run draws the same. For textures, which have no canonical orientation.
    """

    def __init__(self, samples: Sequence[Sample], domains: Sequence[str], shift: Shift | Mapping[str, Shift],
                 image_size: int, resize_size: int | None = None, hide_labels: bool = False,
                 symmetry_seed: int | None = None) -> None:
        unknown = sorted({s.domain for s in samples} - set(domains))
        if unknown:
            raise ValueError(f"samples of domain(s) {unknown} are not in the domain list {list(domains)}")
        if isinstance(shift, Mapping):
            unshifted = sorted({s.domain for s in samples} - set(shift))
            if unshifted:
                raise ValueError(f"samples of domain(s) {unshifted} have no shift in {sorted(shift)}")
        self.samples = list(samples)
        self.domains = list(domains)
        self.shift = shift
        self.image_size = image_size
        self.resize = build_resize(image_size, resize_size)
        self.hide_labels = hide_labels
        self.symmetry_seed = symmetry_seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int) -> dict:
        sample = self.samples[key % len(self.samples)]
        image = read_image(sample.image_path)
        if sample.mask_path is not None:
            mask = read_mask(sample.mask_path, sample.image_path, image.shape[:2], defect=sample.label == 1)
        else:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
        resized = self.resize(image=image, mask=mask)
        shift = self.shift[sample.domain] if isinstance(self.shift, Mapping) else self.shift
        image, mask = shift(resized["image"]), resized["mask"]
        if self.symmetry_seed is not None:
            symmetry = int(rng_for(self.symmetry_seed, "symmetry", str(key)).integers(8))
            image, mask = (square_symmetry(array, symmetry) for array in (image, mask))
        labelled = not self.hide_labels
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0),
            "label": sample.label if labelled else UNLABELLED,
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).float()[None] * float(labelled),
            "has_mask": sample.has_mask and labelled,
            "defect_type": sample.defect_type if labelled else "unlabelled",
            "domain": sample.domain,
            "domain_index": self.domains.index(sample.domain),
            "path": sample.image_path,
        }
