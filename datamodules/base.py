"""What the ShiftAD DataModules share: the source domain, loaders, ``describe``, ``run_tag``."""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.dataset import AnomalyDataset
from datamodules.domain import DomainArg, ResolvedDomain, plain, resolve_source
from datamodules.predict import PREDICT_PATH_KEY, PredictFiles, PredictImages, list_predict_files
from datamodules.readers import Sample
from datamodules.sampling import resumable_loader
from datamodules.shifts import Shift
from datamodules.splits import rng_for
from datamodules.surfaces import ensure_embedded

Description = dict[str, str | int | float | None]


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
        source: the source domain (``datamodules.domain.Domain``); LODO's has no category.
        image_size: side of the square images fed to the model.
        resize_size: resize to this side, then centre-crop ``image_size``; ``None`` resizes directly.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seed of every split and draw (validation hold-out, shots, references).
        style_reference: image file used as style photograph by the ``fda``/``histmatch``/``pda`` shifts
            instead of their default scikit-image photograph.
        predict_path: the images ``predict`` scores (``datamodules.predict``): a folder (read recursively), an
            image file or a glob; resized as the evaluation images, with no synthetic shift.

    Subclasses resolve ``self.target`` (the domain they test on) in their ``__init__``.
    """

    target: ResolvedDomain

    def __init__(self, source: DomainArg, image_size: int, resize_size: int | None, batch_size: int,
                 num_workers: int, seed: int, style_reference: str | None, source_needs_category: bool = True,
                 predict_path: str | None = None) -> None:
        super().__init__()
        if image_size < 8 or batch_size < 1 or num_workers < 0:
            raise ValueError(f"need image_size >= 8, batch_size >= 1, num_workers >= 0; got {image_size}, "
                             f"{batch_size}, {num_workers}")
        self.source = resolve_source(source, needs_category=source_needs_category)
        self.image_size = image_size
        self.resize_size = resize_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.style_reference = style_reference
        # Listed now, so that a missing or empty path is a config error before any model is built.
        self.predict_files: PredictFiles | None = (list_predict_files(predict_path) if predict_path is not None
                                                   else None)
        self._is_set_up = False

    def save_hyperparameters(self, *args, ignore=None, frame=None, logger: bool = True) -> None:
        """As Lightning's, with every ``Domain`` stored as a plain dict (checkpoints load with weights_only)."""
        super().save_hyperparameters(*args, ignore=ignore, frame=frame or inspect.currentframe().f_back,
                                     logger=logger)
        for store in (self._hparams, self._hparams_initial):
            for key, value in store.items():
                store[key] = plain(value)

    def domains_read(self) -> list[ResolvedDomain]:
        """Every domain whose images this DataModule reads (the embedded ones are built by ``prepare_data``)."""
        return [self.source, self.target]

    # ------------------------------------------------------------------------------------------ hooks

    def prepare_data(self) -> None:
        for domain in self.domains_read():
            if domain.embedded:  # builds it if absent; a build of the other line there is an error
                with domain.naming():
                    ensure_embedded(domain.dataset, domain.root)

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

    def predict_dataloader(self) -> DataLoader:
        """The images under ``predict_path``, in batches of ``{"image", "path", "original_size"}``."""
        if self.predict_files is None:
            raise ValueError(f"predict needs images: set {PREDICT_PATH_KEY} to a folder, an image file or a glob "
                             f"(--{PREDICT_PATH_KEY} /data/line_b/new)")
        rank_zero_info(self.predict_files.describe())
        trainer = self.trainer
        dataset = PredictImages(self.predict_files.images, self.image_size, self.resize_size,
                                rank=trainer.global_rank if trainer else 0,
                                world_size=trainer.world_size if trainer else 1)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def _require_setup(self) -> None:
        if not self._is_set_up:
            raise RuntimeError(f"{type(self).__name__}: call setup() (or let the Trainer do it) first")

    def target_is_other_folder(self) -> bool:
        """Whether the target's images are not the source's (another dataset, folder or category)."""
        return not self.target.same_images_as(self.source)

    def describe(self) -> Description:
        """What data this run used, as flat values (for results files and W&B tags)."""
        described: Description = {"dataset": self.source.dataset, "source_shift": self.source.shift,
                                  "target_shift": self.target.shift, "seed": self.seed, "image_size": self.image_size}
        if self.target_is_other_folder():
            described.update(target_dataset=self.target.dataset, target_root=str(self.target.root),
                             target_category=",".join(self.target.categories))
        return described

    @property
    def run_tag(self) -> str:
        raise NotImplementedError

