"""One-class anomaly detection, optionally under a source -> target domain shift, with few-shot targets."""

from __future__ import annotations

from typing import Literal, get_args

from torch.utils.data import ConcatDataset, DataLoader

from datamodules.base import Description, ShiftADDataModule, categories_tag, check_source, safe_tag
from datamodules.dataset import AnomalyDataset
from datamodules.splits import draw_shots, hold_out

TrainOn = Literal["source", "target_shots", "source+target_shots", "target"]
TRAIN_ON: tuple[str, ...] = get_args(TrainOn)
_TRAIN_ON_TAGS = {"source": "", "target": "on-target", "target_shots": "on-shots", "source+target_shots": "on-source+shots"}


class OneClassDataModule(ShiftADDataModule):
    """Train on normal images, test on normal and defective ones (paper 001's protocol and the usual AD setup).

    The target domain is the same images under ``target_shift``. Splits, per category:

    - ``train``: the train normals minus the validation hold-out, chosen by ``train_on``:
      ``source`` (under ``source_shift``; source-only baseline and phase 1), ``target`` (all of them
      under ``target_shift``; full-target baseline), ``target_shots`` (only the k target shots) or
      ``source+target_shots`` (both).
    - ``val``: a held-out ``val_fraction`` of the train normals (never test images), under
      ``source_shift``, or ``target_shift`` when ``train_on="target"``.
    - ``test``: the test split (normals and defects) under ``target_shift``.
    - ``target_train_dataloader()``: the k target shots under ``target_shift``, for phase-2 adaptation.
      The shots are drawn from the train normals (never the validation or test images): the pool is
      permuted by ``seed`` and cut into ``num_folds`` disjoint chunks; fold f uses k images of chunk f.

    Batches are dicts of the sample contract in ``datamodules.dataset``; images in [0, 1], NOT normalised
    (the model's ``FeatureExtractor`` applies its weights' mean/std). A list of categories pools them,
    each with its own ``domain_index`` (its position in the list).

    Args:
        dataset: ``surfaces``, ``mvtec``, ``visa``, ``btad`` or ``folder``.
        root: dataset folder; ``None`` only for ``surfaces`` (built on first use in ``$SHIFTAD_CACHE``).
        category: one category, or a list of categories pooled together.
        image_size: side of the square images fed to the model.
        resize_size: resize to this side, then centre-crop ``image_size``; ``None`` resizes directly.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seed of the validation hold-out and of the shot draw.
        source_shift: shift of the source (training) domain; ``None`` is no shift.
        target_shift: shift of the target (test) domain; ``None`` is no shift.
        style_reference: style photograph replacing the default one of ``fda``/``histmatch``/``pda``.
        val_fraction: fraction of the train normals held out for validation.
        train_on: ``source``, ``target``, ``target_shots`` or ``source+target_shots``.
        target_shots: k, the number of target normal images per category (paper 001: 1, 5 or 10).
        fold: cross-validation fold of the shot draw, in [0, num_folds).
        num_folds: number of disjoint shot folds.
    """

    def __init__(
        self,
        dataset: str = "surfaces",
        root: str | None = None,
        category: str | list[str] = "brick",
        image_size: int = 256,
        resize_size: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        source_shift: str | None = None,
        target_shift: str | None = None,
        style_reference: str | None = None,
        val_fraction: float = 0.1,
        train_on: TrainOn = "source",
        target_shots: int | None = None,
        fold: int = 0,
        num_folds: int = 5,
    ) -> None:
        super().__init__(dataset, root, image_size, resize_size, batch_size, num_workers, seed, source_shift,
                         target_shift, style_reference)
        self.save_hyperparameters()
        self.categories = [category] if isinstance(category, str) else list(category)
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"category must be one name or a list of distinct names, got {category!r}")
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        if "shots" in train_on and target_shots is None:
            raise ValueError(f"train_on={train_on!r} needs target_shots (k, e.g. 1, 5 or 10)")
        if target_shots is not None and target_shots < 1:
            raise ValueError(f"target_shots must be >= 1, got {target_shots}")
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in [0, num_folds={num_folds}), got {fold}")
        self.val_fraction = val_fraction
        self.train_on = train_on
        self.target_shots = target_shots
        self.fold = fold
        self.num_folds = num_folds
        check_source(dataset, self.root, self.categories)

    def _build(self) -> None:
        train, val, shots, test = [], [], [], []
        for category in self.categories:
            samples = self._read(category)
            kept, held = hold_out(samples.train, self.val_fraction, self.seed, "val", category)
            train += kept
            val += held
            test += samples.test
            if self.target_shots is not None:
                shots += draw_shots(kept, self.target_shots, self.fold, self.num_folds, self.seed, category)
        domains = self.categories
        self.target_shots_dataset: AnomalyDataset | None = (
            self._dataset(shots, domains, self.target_shift) if shots else None
        )
        parts = {
            "source": [self._dataset(train, domains, self.source_shift)],
            "target": [self._dataset(train, domains, self.target_shift)],
            "target_shots": [self.target_shots_dataset],
            "source+target_shots": [self._dataset(train, domains, self.source_shift), self.target_shots_dataset],
        }[self.train_on]
        self.train_dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        val_shift = self.target_shift if self.train_on == "target" else self.source_shift
        self.val_dataset = self._dataset(val, domains, val_shift)
        self.test_dataset = self._dataset(test, domains, self.target_shift)

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._train_loader(self.train_dataset)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def target_train_dataloader(self) -> DataLoader:
        """The k target normal shots under ``target_shift`` (shuffled), for few-shot adaptation."""
        self._require_setup()
        if self.target_shots_dataset is None:
            raise ValueError("target_train_dataloader() needs target_shots (k) to be set")
        return self._train_loader(self.target_shots_dataset)

    def describe(self) -> Description:
        return {
            **super().describe(),
            "category": ",".join(self.categories),
            "held_out": None,
            "train_on": self.train_on,
            "shots": self.target_shots,
            "fold": self.fold if self.target_shots is not None else None,
        }

    @property
    def run_tag(self) -> str:
        shots = f"k{self.target_shots}-f{self.fold}" if self.target_shots is not None else ""
        return safe_tag(self.dataset, categories_tag(self.categories), self.source_shift, "to", self.target_shift,
                        _TRAIN_ON_TAGS[self.train_on], shots)
