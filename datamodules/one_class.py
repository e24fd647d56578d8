"""One-class anomaly detection, optionally under a source -> target domain shift, with few-shot targets."""

from __future__ import annotations

from typing import Literal, get_args

from torch.utils.data import ConcatDataset, DataLoader

from datamodules.base import Description, ShiftADDataModule, categories_tag, safe_tag
from datamodules.dataset import AnomalyDataset
from datamodules.domain import UNSET, Domain, ResolvedDomain, is_explicit, report_shift, resolve_target
from datamodules.splits import draw_shots, hold_out

TrainOn = Literal["source", "target_shots", "source+target_shots", "target"]
TRAIN_ON: tuple[str, ...] = get_args(TrainOn)
_TRAIN_ON_TAGS = {"source": "", "target": "on-target", "target_shots": "on-shots", "source+target_shots": "on-source+shots"}


SOURCE_DEFAULT = Domain(dataset="surfaces", category="brick")

class OneClassDataModule(ShiftADDataModule):
    """Train on normal images, test on normal and defective ones (paper 001's protocol and the usual AD setup).

    The target is a synthetic shift of the source's images (``target: {shift: gray}``) or other images
    (``target: {root: /data/lineB}``, ``{dataset: surfaces_line_b}``); see ``datamodules.domain``. Splits, per
    category of each domain:

    - ``train``: train normals minus the validation hold-out, chosen by ``train_on``: ``source`` (the
      source's; source-only baseline and phase 1), ``target`` (the target's; full-target baseline),
      ``target_shots`` (only the k target shots) or ``source+target_shots`` (both).
    - ``val``: a held-out ``val_fraction`` of the train normals (never test images) of the source, or of
      the target when ``train_on="target"``.
    - ``test`` (``test_dataloader()``, named by ``test_dataloader_names``): the target's test split (normals
      and defects), then the source's when the source differs from the target (other images or shift),
      so that one test run reports both domains.
    - ``target_train_dataloader()``: the k target shots, for phase-2 adaptation. They are drawn from the
      target's train normals minus its validation hold-out (never validation or test images): the pool is
      permuted by ``seed`` and cut into ``num_folds`` disjoint chunks; fold f uses k images of chunk f.

    Batches are dicts of the sample contract in ``datamodules.dataset``; images in [0, 1], NOT normalised
    (the model's ``FeatureExtractor`` applies its weights' mean/std). A list of categories pools them,
    each with its own ``domain_index`` (its position in the list; target categories not in the source's
    list follow them).

    Args:
        source: the training domain: dataset, root, category (one or a list) and shift.
        target: the test domain; unset fields are the source's (``shift`` excepted: unset is none).
        image_size: side of the square images fed to the model.
        resize_size: resize to this side, then centre-crop ``image_size``; ``None`` resizes directly.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seed of the validation hold-out and of the shot draw.
        style_reference: style photograph replacing the default one of ``fda``/``histmatch``/``pda``.
        val_fraction: fraction of the train normals held out for validation.
        train_on: ``source``, ``target``, ``target_shots`` or ``source+target_shots``.
        target_shots: k, the number of target normal images per category (paper 001: 1, 5 or 10).
        fold: cross-validation fold of the shot draw, in [0, num_folds).
        num_folds: number of disjoint shot folds.
        predict_path: the images ``predict`` scores: a folder (recursive), an image file or a glob.
    """

    def __init__(
        self,
        source: Domain = SOURCE_DEFAULT,
        target: Domain = UNSET,
        image_size: int = 256,
        resize_size: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        style_reference: str | None = None,
        val_fraction: float = 0.1,
        train_on: TrainOn = "source",
        target_shots: int | None = None,
        fold: int = 0,
        num_folds: int = 5,
        predict_path: str | None = None,
    ) -> None:
        super().__init__(source, image_size, resize_size, batch_size, num_workers, seed, style_reference,
                         predict_path=predict_path)
        self.save_hyperparameters()
        self.target = resolve_target(target, self.source)
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
        self.categories = list(self.source.categories)
        self.domains = self.categories + [c for c in self.target.categories if c not in self.categories]
        self.source.check()
        if self.target_is_other_folder():
            self.target.check()
        report_shift(self.source, self.target, warn_no_shift=is_explicit(target))
        tests_source = self.target_is_other_folder() or self.source.shift != self.target.shift
        self.test_dataloader_names: tuple[str, ...] = ("target", "source") if tests_source else ("target",)

    def _splits(self, domain: ResolvedDomain, with_shots: bool) -> tuple[list, list, list, list]:
        """(train normals kept, validation hold-out, k shots, test split) of a domain, over its categories."""
        kept, held, shots, test = [], [], [], []
        for category in domain.categories:
            samples = domain.read(category)
            with domain.naming():
                category_kept, category_held = hold_out(samples.train, self.val_fraction, self.seed, "val", category)
                if with_shots and self.target_shots is not None:
                    shots += draw_shots(category_kept, self.target_shots, self.fold, self.num_folds, self.seed,
                                        category)
            kept += category_kept
            held += category_held
            test += samples.test
        return kept, held, shots, test

    def _build(self) -> None:
        if self.target_is_other_folder():
            source_train, source_val, _, source_test = self._splits(self.source, with_shots=False)
            target_train, target_val, shots, target_test = self._splits(self.target, with_shots=True)
        else:  # the same images: one hold-out and test split, under each domain's shift
            target_train, target_val, shots, target_test = self._splits(self.target, with_shots=True)
            source_train, source_val, source_test = target_train, target_val, target_test
        domains = self.domains
        self.target_shots_dataset: AnomalyDataset | None = (
            self._dataset(shots, domains, self.target.shift) if shots else None
        )
        parts = {
            "source": [self._dataset(source_train, domains, self.source.shift)],
            "target": [self._dataset(target_train, domains, self.target.shift)],
            "target_shots": [self.target_shots_dataset],
            "source+target_shots": [self._dataset(source_train, domains, self.source.shift),
                                    self.target_shots_dataset],
        }[self.train_on]
        self.train_dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        if self.train_on == "target":
            self.val_dataset = self._dataset(target_val, domains, self.target.shift)
        else:
            self.val_dataset = self._dataset(source_val, domains, self.source.shift)
        self.test_dataset = self._dataset(target_test, domains, self.target.shift)
        self.source_test_dataset: AnomalyDataset | None = (
            self._dataset(source_test, domains, self.source.shift) if "source" in self.test_dataloader_names
            else None
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._train_loader(self.train_dataset)

    def test_dataloader(self) -> list[DataLoader]:
        """The target's test split, then the source's when they differ (``test_dataloader_names``)."""
        self._require_setup()
        loaders = [self._loader(self.test_dataset)]
        if self.source_test_dataset is not None:
            loaders.append(self._loader(self.source_test_dataset))
        return loaders

    def target_train_dataloader(self) -> DataLoader:
        """The k target normal shots under the target's shift (shuffled), for few-shot adaptation."""
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
        target = ([self.target.folder_tag(self.source), categories_tag(self.target.categories)]
                  if self.target_is_other_folder() else [])
        return safe_tag(self.source.dataset, categories_tag(self.categories), self.source.shift, "to", *target,
                        self.target.shift, _TRAIN_ON_TAGS[self.train_on], shots)
