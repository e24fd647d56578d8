"""Paired-domain data for unsupervised domain adaptation of a defect classifier (paper 000)."""

from __future__ import annotations

from torch.utils.data import DataLoader

from datamodules.base import Description, ShiftADDataModule, check_source, safe_tag
from datamodules.splits import stratified_split


class PairedDomainDataModule(ShiftADDataModule):
    """Labelled source domain and unlabelled target domain made of the same images under two shifts.

    All images of ``category`` (train normals, test normals and defects) are pooled and split by ``seed``
    into train/val/test, stratified by defect type. The source domain is each split under
    ``source_shift``, the target domain the same split under ``target_shift``. Paper 000: source = the
    grayscale images with labels (``source_shift="gray"``), target = the RGB originals without labels.

    Dataloaders:

    - ``train_dataloader()``: ``{"source": DataLoader, "target": DataLoader}`` over the train split, both
      shuffled with ``drop_last=True``; Lightning combines them (``max_size_cycle``). Target samples hide
      their labels: label -1, empty mask, has_mask False, defect_type ``"unlabelled"``.
    - ``val_dataloader()``: the source val split (dataloader_idx 0). With ``target_val=True`` the target
      val split with labels is added as dataloader_idx 1: that is the target-label ORACLE for model
      selection, to be reported under that name.
    - ``test_dataloader()``: ``[target test, source test]``: dataloader_idx 0 is the target test split
      (target accuracy), 1 the same images under the source shift (source accuracy). Both labelled.

    Items follow the sample contract of ``datamodules.dataset``; images in [0, 1], NOT normalised (the
    model's ``FeatureExtractor`` owns the weights' mean/std).

    Args:
        dataset: ``surfaces``, ``mvtec``, ``visa``, ``btad`` or ``folder``.
        root: dataset folder; ``None`` only for ``surfaces`` (built on first use in ``$SHIFTAD_CACHE``).
        category: the category whose images are pooled.
        image_size: side of the square images fed to the model.
        resize_size: resize to this side, then centre-crop ``image_size``; ``None`` resizes directly.
        batch_size: images per batch and per domain.
        num_workers: DataLoader worker processes.
        seed: seed of the stratified split.
        source_shift: shift of the labelled source domain (paper 000: ``gray``).
        target_shift: shift of the unlabelled target domain (paper 000: ``None``, the originals).
        style_reference: style photograph replacing the default one of ``fda``/``histmatch``/``pda``.
        val_fraction: fraction of every defect type (and of the normals) in the val split.
        test_fraction: fraction of every defect type (and of the normals) in the test split.
        target_val: also validate on the labelled target val split (the oracle), as dataloader_idx 1.
        symmetry_augment: train on random flips and quarter-turns of the training images (both domains;
            see ``AnomalyDataset``). For textures; object categories have an orientation.
    """

    val_dataloader_names = ("source", "target_oracle")
    test_dataloader_names = ("target", "source")

    def __init__(
        self,
        dataset: str = "surfaces",
        root: str | None = None,
        category: str = "brick",
        image_size: int = 256,
        resize_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        source_shift: str | None = "gray",
        target_shift: str | None = None,
        style_reference: str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        target_val: bool = False,
        symmetry_augment: bool = False,
    ) -> None:
        super().__init__(dataset, root, image_size, resize_size, batch_size, num_workers, seed, source_shift,
                         target_shift, style_reference)
        self.save_hyperparameters()
        self.category = category
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.target_val = target_val
        self.symmetry_augment = symmetry_augment
        check_source(dataset, self.root, [category])

    def _build(self) -> None:
        samples = self._read(self.category)
        train, val, test = stratified_split(samples.train + samples.test, lambda s: s.defect_type,
                                            self.val_fraction, self.test_fraction, self.seed, "paired",
                                            self.category)
        for name, split in (("train", train), ("val", val), ("test", test)):
            if not split:
                raise ValueError(f"the {name} split of {self.category!r} is empty; adjust val_fraction/test_fraction")
        if len(train) < self.batch_size:
            raise ValueError(f"the train split of {self.category!r} has {len(train)} images, fewer than "
                             f"batch_size={self.batch_size}; with drop_last=True there would be no batch")
        domains = [self.category]
        augment = self.symmetry_augment
        self.source_train = self._dataset(train, domains, self.source_shift,
                                          symmetry_stream="source" if augment else None)
        self.target_train = self._dataset(train, domains, self.target_shift, hide_labels=True,
                                          symmetry_stream="target" if augment else None)
        self.target_statistics = self._dataset(train, domains, self.target_shift, hide_labels=True)
        self.source_val = self._dataset(val, domains, self.source_shift)
        self.target_val_dataset = self._dataset(val, domains, self.target_shift)
        self.target_test = self._dataset(test, domains, self.target_shift)
        self.source_test = self._dataset(test, domains, self.source_shift)

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
        return safe_tag(self.dataset, self.category, self.source_shift, "to", self.target_shift, "da",
                        "oracle" if self.target_val else "")
