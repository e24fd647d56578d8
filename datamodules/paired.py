"""Paired-domain data for unsupervised domain adaptation of a defect classifier (paper 000)."""

from __future__ import annotations

from torch.utils.data import DataLoader

from datamodules.base import Description, ShiftADDataModule, safe_tag
from datamodules.domain import UNSET, Domain, ResolvedDomain, report_shift, resolve_target
from datamodules.splits import stratified_split

SOURCE_DEFAULT = Domain(dataset="surfaces", category="brick", shift="gray")  # paper 000

class PairedDomainDataModule(ShiftADDataModule):
    """Labelled source domain and unlabelled target domain, for domain adaptation of a defect classifier.

    All images of the source category (train normals, test normals and defects) are pooled and split by
    ``seed`` into train/val/test, stratified by defect type. When the target is the same images under
    another shift (paper 000: source ``{shift: gray}`` with labels, target the RGB originals without), the
    target splits are the same splits under the target's shift. When the target is other images (another
    folder, dataset or category), its own images are pooled and split the same way (same fractions and
    seed). Either way the target's test split is labelled and gives the target metrics.

    Dataloaders:

    - ``train_dataloader()``: ``{"source": DataLoader, "target": DataLoader}`` over the train splits, both
      shuffled with ``drop_last=True`` and as many batches as the larger of the two; Lightning combines
      them (``max_size_cycle``). Target samples hide their labels: label -1, empty mask, has_mask False,
      defect_type ``"unlabelled"``.
    - ``val_dataloader()``: the source val split (dataloader_idx 0). With ``target_val=True`` the target
      val split with labels is added as dataloader_idx 1: that is the target-label ORACLE for model
      selection, to be reported under that name.
    - ``test_dataloader()``: ``[target test, source test]`` (``test_dataloader_names``), both labelled.

    Items follow the sample contract of ``datamodules.dataset``; images in [0, 1], NOT normalised (the
    model's ``FeatureExtractor`` owns the weights' mean/std).

    Args:
        source: the labelled domain: dataset, root, one category and shift (paper 000: ``shift: gray``).
        target: the unlabelled domain; unset fields are the source's (``shift`` excepted: unset is none).
        image_size: side of the square images fed to the model.
        resize_size: resize to this side, then centre-crop ``image_size``; ``None`` resizes directly.
        batch_size: images per batch and per domain.
        num_workers: DataLoader worker processes.
        seed: seed of the stratified split.
        style_reference: style photograph replacing the default one of ``fda``/``histmatch``/``pda``.
        val_fraction: fraction of every defect type (and of the normals) in the val split.
        test_fraction: fraction of every defect type (and of the normals) in the test split.
        target_val: also validate on the labelled target val split (the oracle), as dataloader_idx 1.
        symmetry_augment: train on random flips and quarter-turns of the training images (both domains;
            see ``AnomalyDataset``). For textures; object categories have an orientation.
        predict_path: the images ``predict`` scores: a folder (recursive), an image file or a glob.
    """

    val_dataloader_names = ("source", "target_oracle")
    test_dataloader_names = ("target", "source")

    def __init__(
        self,
        source: Domain = SOURCE_DEFAULT,
        target: Domain = UNSET,
        image_size: int = 256,
        resize_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        style_reference: str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        target_val: bool = False,
        symmetry_augment: bool = False,
        predict_path: str | None = None,
    ) -> None:
        super().__init__(source, image_size, resize_size, batch_size, num_workers, seed, style_reference,
                         predict_path=predict_path)
        self.save_hyperparameters()
        self.target = resolve_target(target, self.source)
        self.category = self.source.category
        self.target_category = self.target.category
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.target_val = target_val
        self.symmetry_augment = symmetry_augment
        self.source.check()
        if self.target_is_other_folder():
            self.target.check()
        report_shift(self.source, self.target, warn_no_shift=True)

    def _split(self, domain: ResolvedDomain, *names: str) -> tuple[list, list, list]:
        samples = domain.read(domain.category)
        with domain.naming():
            splits = stratified_split(samples.train + samples.test, lambda s: s.defect_type, self.val_fraction,
                                      self.test_fraction, self.seed, *names, domain.category)
            for name, split in zip(("train", "val", "test"), splits, strict=True):
                if not split:
                    raise ValueError(f"the {name} split of {domain.category!r} is empty; adjust "
                                     "val_fraction/test_fraction")
            if len(splits[0]) < self.batch_size:
                raise ValueError(f"the train split of {domain.category!r} has {len(splits[0])} images, fewer than "
                                 f"batch_size={self.batch_size}; with drop_last=True there would be no batch")
        return splits

    def _build(self) -> None:
        train, val, test = self._split(self.source, "paired")
        if self.target_is_other_folder():
            target_train, target_val, target_test = self._split(self.target, "paired", "target")
        else:
            target_train, target_val, target_test = train, val, test
        domains = list(dict.fromkeys([self.category, self.target_category]))
        augment = self.symmetry_augment
        self.source_train = self._dataset(train, domains, self.source.shift,
                                          symmetry_stream="source" if augment else None)
        self.target_train = self._dataset(target_train, domains, self.target.shift, hide_labels=True,
                                          symmetry_stream="target" if augment else None)
        self.target_statistics = self._dataset(target_train, domains, self.target.shift, hide_labels=True)
        self.source_val = self._dataset(val, domains, self.source.shift)
        self.target_val_dataset = self._dataset(target_val, domains, self.target.shift)
        self.target_test = self._dataset(target_test, domains, self.target.shift)
        self.source_test = self._dataset(test, domains, self.source.shift)

    def train_dataloader(self) -> dict[str, DataLoader]:
        self._require_setup()
        epoch_samples = max(len(self.source_train), len(self.target_train))
        return {"source": self._train_loader(self.source_train, True, epoch_samples, epoch_keys=True, stream="source"),
                "target": self._train_loader(self.target_train, True, epoch_samples, epoch_keys=True, stream="target")}

    def target_statistics_dataloader(self) -> DataLoader:
        """Every unlabelled target train image once, in dataset order, not augmented (AdaBN's statistics).

        Not the training loader: its shuffle, ``drop_last`` and symmetries depend on the epoch and rank, so the
        statistics at the end of a fit would differ from a later ``test`` of its checkpoint and between ranks.
        """
        self._require_setup()
        return self._loader(self.target_statistics)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        self._require_setup()
        source = self._loader(self.source_val)
        return [source, self._loader(self.target_val_dataset)] if self.target_val else source

    def test_dataloader(self) -> list[DataLoader]:
        self._require_setup()
        return [self._loader(self.target_test), self._loader(self.source_test)]

    def describe(self) -> Description:
        return {**super().describe(), "category": self.category, "held_out": None, "shots": None, "fold": None,
                "target_val_oracle": self.target_val}

    @property
    def run_tag(self) -> str:
        target = ([self.target.folder_tag(self.source), self.target_category]
                  if self.target_is_other_folder() else [])
        return safe_tag(self.source.dataset, self.category, self.source.shift, "to", *target, self.target.shift,
                        "da", "oracle" if self.target_val else "")
