"""The semi-formula-driven pre-training set of paper 003: normal images paired with random θ_GMM.

Nothing is stored: item i is a normal image from the pool (random crop and flip) and a θ_GMM, both drawn
from a generator seeded by (seed, split, i), so the paper's 1M images are a length and not a folder, every
process of a DDP run sees distinct items, and a resumed run sees the same set. The pseudo-defect itself is
rendered on the device by the model (``render_defects``), batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import skimage.data
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.base import categories_tag, safe_tag
from datamodules.dataset import read_image
from datamodules.domain import Domain, resolve_source
from datamodules.sampling import resumable_loader
from datamodules.surfaces import PHOTOS_OUTSIDE_SURFACES, skimage_photo
from lightning_modules.components.gmm_defects import num_outputs, sample_gmm_params

SKIMAGE = "skimage"


class NormalPool:
    """Normal images to paint pseudo-defects on: a dataset's train normals (files, read on demand) or
    scikit-image photographs (held in memory)."""

    def __init__(self, pool: str, root: str | None, categories: Sequence[str] | None,
                 photos: Sequence[str] = PHOTOS_OUTSIDE_SURFACES) -> None:
        self.pool = pool
        if pool == SKIMAGE:
            unknown = [name for name in photos if not callable(getattr(skimage.data, name, None))]
            if unknown or not photos:
                raise ValueError(f"pool=skimage: photos must be skimage.data image names, got unknown {unknown}")
            self.photos = [skimage_photo(name) for name in photos]
            self.paths: list[str] = []
            return
        if not categories:
            raise ValueError(f"pool={pool!r} needs categories=[...] whose train normals form the pool")
        domain = resolve_source(Domain(dataset=pool, root=root, category=list(categories)), role="pool")
        self.paths = [s.image_path for c in domain.categories for s in domain.read(c).train]
        self.photos = []
        if not self.paths:
            raise ValueError(f"pool={pool!r} categories {list(categories)} under {domain.root} hold no train images")

    def __len__(self) -> int:
        return len(self.photos) or len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.photos[index] if self.photos else read_image(self.paths[index])


class PseudoDefectPairs(Dataset):
    """Item i: ``{"normal": [3, S, S] in [0, 1], "theta": flat θ_GMM [K(C+6)+1], "index": i}``.

    Args:
        pool: the normal images.
        length: number of items (the paper: 1,000,000).
        image_size: side S of the square crops.
        num_gaussians: K.
        num_channels: C (1: grey defects, 3: coloured).
        min_crop: smallest crop side, as a fraction of the image's short side (1.0: the largest square).
        seed: with ``stream``, seeds every item's draw.
        stream: a name that separates the training, validation and test items.
    """

    def __init__(self, pool: NormalPool, length: int, image_size: int, num_gaussians: int, num_channels: int,
                 min_crop: float, seed: int, stream: str) -> None:
        self.pool = pool
        self.length = length
        self.image_size = image_size
        self.num_gaussians = num_gaussians
        self.num_channels = num_channels
        self.min_crop = min_crop
        self.seed_words = [seed, sum(map(ord, stream))]  # "train" and "val" give different words

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([*self.seed_words, index])
        image = self.pool[int(rng.integers(len(self.pool)))]
        short = min(image.shape[:2])
        side = max(1, int(round(short * rng.uniform(self.min_crop, 1.0))))
        top = int(rng.integers(image.shape[0] - side + 1))
        left = int(rng.integers(image.shape[1] - side + 1))
        crop = cv2.resize(image[top:top + side, left:left + side], (self.image_size, self.image_size),
                          interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        normal = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        theta = sample_gmm_params(1, self.num_gaussians, self.num_channels, generator=generator).flatten()[0]
        return {"normal": normal, "theta": theta, "index": index}


class GMMPretrainDataModule(LightningDataModule):
    """Pairs of (normal image, θ_GMM) generated on the fly; validation is a fixed set of further pairs.

    Args:
        pool: ``skimage`` (photographs, see ``photos``) or a dataset name of ``datamodules`` (``btad``,
            ``mvtec``, ``visa``, ``folder``, ``surfaces``) whose train normals form the pool.
        root: that dataset's folder (``None`` only for ``surfaces`` and ``skimage``).
        categories: the dataset categories pooled (paper 003: all of BTAD, 01, 02, 03).
        photos: scikit-image photograph names for ``pool: skimage``.
        image_size: side of the generated images (paper: 224).
        num_gaussians: K (paper: 30). Must match the model's.
        num_channels: C (paper: 3). Must match the model's.
        train_samples: generated training pairs per epoch (paper: 1,000,000).
        val_samples: fixed validation pairs (model selection).
        test_samples: further fixed pairs for ``cli.py test`` (held-out regression error).
        min_crop: smallest random crop, as a fraction of the short side.
        batch_size: pairs per batch (paper: 64).
        num_workers: DataLoader processes.
        seed: seed of all draws.
    """

    def __init__(self, pool: str = SKIMAGE, root: str | None = None, categories: list[str] | None = None,
                 photos: list[str] | None = None, image_size: int = 224, num_gaussians: int = 30,
                 num_channels: int = 3, train_samples: int = 1_000_000, val_samples: int = 64,
                 test_samples: int = 64, min_crop: float = 0.5, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if image_size < 8 or train_samples < 1 or val_samples < 0 or test_samples < 1 or not 0 < min_crop <= 1:
            raise ValueError(f"need image_size >= 8, train_samples >= 1, val_samples >= 0, test_samples >= 1, "
                             f"0 < min_crop <= 1; got {image_size}, {train_samples}, {val_samples}, {test_samples}, "
                             f"{min_crop}")
        if train_samples < batch_size:
            raise ValueError(f"train_samples={train_samples} must be >= batch_size={batch_size} (the last partial "
                             "training batch is dropped)")
        self.pool_name = pool
        self.root = root
        self.categories = list(categories or [])
        self.photos = list(photos or PHOTOS_OUTSIDE_SURFACES)
        self.image_size = image_size
        self.num_gaussians = num_gaussians
        self.num_channels = num_channels
        self.theta_size = num_outputs(num_gaussians, num_channels)
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.test_samples = test_samples
        self.min_crop = min_crop
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: PseudoDefectPairs | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        pool = NormalPool(self.pool_name, self.root, self.categories, self.photos)
        common = (self.image_size, self.num_gaussians, self.num_channels, self.min_crop, self.seed)
        self.train_dataset = PseudoDefectPairs(pool, self.train_samples, *common, stream="train")
        self.val_dataset = PseudoDefectPairs(pool, self.val_samples, *common, stream="val")
        self.test_dataset = PseudoDefectPairs(pool, self.test_samples, *common, stream="test")

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(self.train_dataset, self.batch_size, self.seed, self.trainer, drop_last=True,
                                num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset) if self.val_samples else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def describe(self) -> dict:
        pool = self.pool_name if self.pool_name == SKIMAGE else f"{self.pool_name}:{','.join(self.categories)}"
        return {"dataset": "gmm", "pool": pool, "image_size": self.image_size, "K": self.num_gaussians,
                "C": self.num_channels, "train_samples": self.train_samples, "seed": self.seed}

    @property
    def run_tag(self) -> str:
        pool = self.pool_name if self.pool_name == SKIMAGE else f"{self.pool_name}-{categories_tag(self.categories)}"
        return safe_tag("gmm", pool, f"K{self.num_gaussians}C{self.num_channels}", f"{self.image_size}px")
