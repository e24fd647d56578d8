"""What the ShiftAD DataModules share: dataset/root resolution, shifts, loaders, ``describe``, ``run_tag``."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.dataset import AnomalyDataset
from datamodules.readers import CategorySamples, Sample, check_categories, check_dataset_name, read_category
from datamodules.sampling import resumable_loader
from datamodules.shifts import Shift, check_shift_name
from datamodules.splits import rng_for
from datamodules.surfaces import SURFACES_CATEGORIES, default_surfaces_root, ensure_surfaces, is_built

Description = dict[str, str | int | float | None]


def resolve_root(dataset: str, root: str | None) -> Path:
    """The dataset folder; for ``surfaces`` without ``root`` the default build in the cache folder."""
    check_dataset_name(dataset)
    if root is not None:
        return Path(root).expanduser()
    if dataset == "surfaces":
        return default_surfaces_root()
    raise ValueError(f"dataset={dataset!r} needs root=<folder of the dataset>; only 'surfaces' is built on demand")


def check_source(dataset: str, root: Path, categories: Sequence[str]) -> None:
    """Fail fast (no image scan) on a missing root or category; a surfaces root is built later if absent."""
    if dataset == "surfaces" and not is_built(root):
        unknown = [c for c in categories if c not in SURFACES_CATEGORIES]
        if unknown:
            raise ValueError(f"unknown surfaces category {unknown}; valid: {', '.join(SURFACES_CATEGORIES)}")
        return
    check_categories(dataset, root, list(categories))


def safe_tag(*parts: str) -> str:
    """Filesystem- and W&B-safe run tag."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(p for p in parts if p)).strip("_-")


def categories_tag(categories: Sequence[str]) -> str:
    """The category names, or their count and a short digest when there are many."""
    if len(categories) <= 3:
        return "+".join(categories)
    return f"{len(categories)}cats_{hashlib.sha1(','.join(categories).encode()).hexdigest()[:6]}"


class ShiftADDataModule(LightningDataModule):
    """Base of the ShiftAD DataModules.

    Images come out in [0, 1] and are NOT normalised: the model's feature extractor
    (``lightning_modules.components.backbone.FeatureExtractor``) owns the mean/std of its weights.

    Args:
        dataset: ``surfaces`` (embedded, built on first use), ``mvtec``, ``visa``, ``btad`` or ``folder``
            (any dataset in MVTec AD layout).
        root: dataset folder; ``None`` only for ``surfaces`` (the cache folder, ``$SHIFTAD_CACHE``).
        image_size: side of the square images fed to the model.
        resize_size: resize to this side, then centre-crop ``image_size``; ``None`` resizes directly.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seed of every split and draw (validation hold-out, shots, references).
        source_shift: domain shift of the source domain; ``None``/``none`` is no shift.
        target_shift: domain shift of the target domain; ``None``/``none`` is no shift.
        style_reference: image file used as style photograph by the ``fda``/``histmatch``/``pda`` shifts
            instead of their default scikit-image photograph.
    """

    def __init__(self, dataset: str, root: str | None, image_size: int, resize_size: int | None, batch_size: int,
                 num_workers: int, seed: int, source_shift: str | None, target_shift: str | None,
                 style_reference: str | None) -> None:
        super().__init__()
        if image_size < 8 or batch_size < 1 or num_workers < 0:
            raise ValueError(f"need image_size >= 8, batch_size >= 1, num_workers >= 0; got {image_size}, "
                             f"{batch_size}, {num_workers}")
        self.dataset = dataset
        self.root = resolve_root(dataset, root)
        self.image_size = image_size
        self.resize_size = resize_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.source_shift = check_shift_name(source_shift)
        self.target_shift = check_shift_name(target_shift)
        self.style_reference = style_reference
        self._is_set_up = False

    # ------------------------------------------------------------------------------------------ hooks

    def prepare_data(self) -> None:
        if self.dataset == "surfaces":
            ensure_surfaces(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self._is_set_up:
            return
        self.prepare_data()  # no-op when built; covers setup() without the Trainer calling prepare_data()
        self._build()
        self._is_set_up = True

    def _build(self) -> None:
        """Read the samples and create the datasets (called once by ``setup``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ helpers

    def _read(self, category: str, dataset: str | None = None, root: Path | None = None) -> CategorySamples:
        return read_category(dataset or self.dataset, root or self.root, category)

    def _dataset(self, samples: Sequence[Sample], domains: Sequence[str], shift: str,
                 hide_labels: bool = False, symmetry_stream: str | None = None) -> AnomalyDataset:
        """``symmetry_stream``: a training set augmented with the square's symmetries, drawn per stream."""
        symmetry_seed = (None if symmetry_stream is None
                         else int(rng_for(self.seed, "symmetry", symmetry_stream).integers(2**31)))
        return AnomalyDataset(samples, domains, Shift(shift, self.style_reference), self.image_size,
                              self.resize_size, hide_labels, symmetry_seed)

    def _loader(self, dataset: Dataset, batch_size: int | None = None) -> DataLoader:
        """An evaluation loader, in dataset order."""
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def _train_loader(self, dataset: Dataset, drop_last: bool = False, epoch_samples: int | None = None,
                      epoch_keys: bool = False, stream: str = "train") -> DataLoader:
        """Shuffled by (``seed``, ``stream``, epoch); a resumed fit continues the epoch where its checkpoint
        stopped. Loaders of one epoch get different ``stream`` names so they do not share an order."""
        seed = int(rng_for(self.seed, "loader", stream).integers(2**31))
        return resumable_loader(dataset, self.batch_size, seed, self.trainer, drop_last, self.num_workers,
                                epoch_samples, epoch_keys)

    def val_dataloader(self) -> DataLoader | list:
        """The held-out validation split (never test images); none when it is empty."""
        self._require_setup()
        return self._loader(self.val_dataset) if len(self.val_dataset) else []

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test_dataset)

    def _require_setup(self) -> None:
        if not self._is_set_up:
            raise RuntimeError(f"{type(self).__name__}: call setup() (or let the Trainer do it) first")

    def describe(self) -> Description:
        """What data this run used, as flat values (for results files and W&B tags)."""
        return {"dataset": self.dataset, "source_shift": self.source_shift, "target_shift": self.target_shift,
                "seed": self.seed, "image_size": self.image_size}

    @property
    def run_tag(self) -> str:
        raise NotImplementedError

