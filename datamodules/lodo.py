"""Leave-one-domain-out episodes for domain-generalised anomaly detection (paper 002)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import Description, ShiftADDataModule, check_source, resolve_root, safe_tag
from datamodules.dataset import AnomalyDataset
from datamodules.splits import draw_fraction, rng_for, stratified_split
from datamodules.surfaces import SURFACES_CATEGORIES, ensure_surfaces


class EpisodeDataset(Dataset):
    """Query images, each with ``num_references`` normal reference images of the query's own domain.

    Item: ``{"query": <sample dict>, "references": float32 [R, 3, H, W]}``; batched by the default
    collate into ``{"query": <batched sample dict>, "references": [B, R, 3, H, W]}``. References are drawn
    without replacement from the domain's normals, never the query itself, by a generator seeded with
    (``seed``, ``stream``, key): training keys are ``epoch * len + index`` (``ResumableSampler(epoch_keys=True)``), so
    every epoch draws afresh and a resumed run draws what the uninterrupted one would; validation uses
    the plain index, the same references every time.
    """

    def __init__(self, queries: AnomalyDataset, normals: AnomalyDataset, num_references: int, seed: int,
                 stream: str) -> None:
        self.queries = queries
        self.normals = normals
        self.num_references = num_references
        self.seed = seed
        self.stream = stream
        self.pools: dict[str, list[int]] = {}
        for index, sample in enumerate(normals.samples):
            self.pools.setdefault(sample.domain, []).append(index)
        for domain in sorted({s.domain for s in queries.samples}):
            available = len(self.pools.get(domain, []))
            if available - 1 < num_references:
                raise ValueError(f"domain {domain!r} has {available} normal training images; num_references="
                                 f"{num_references} needs at least {num_references + 1}")

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, key: int) -> dict:
        query = self.queries[key % len(self.queries)]
        pool = [i for i in self.pools[query["domain"]] if self.normals.samples[i].image_path != query["path"]]
        picks = rng_for(self.seed, self.stream, "references", str(key)).permutation(len(pool))[: self.num_references]
        references = torch.stack([self.normals[pool[i]]["image"] for i in picks])
        return {"query": query, "references": references}


class LODODataModule(ShiftADDataModule):
    """Leave-one-domain-out: learn to compare queries with normal references on the source domains, test on
    the held-out domain with references from its normal training images only.

    - Training episodes (``train_dataloader``): a query from a source domain (any of its images, train
      normals, test normals and defects, with its image-level label) together with ``num_references``
      normal reference images of the SAME source domain. Batch:
      ``{"query": <batched sample dict>, "references": float32 [B, R, 3, H, W]}``.
      Only image-level labels should be used in training; masks are there for analysis.
    - Validation (``val_dataloader``): a held-out ``val_fraction`` of the source queries (stratified by
      defect type), as episodes with fixed references.
    - Test (``test_dataloader``): the held-out domain's test images as plain sample dicts.
    - Held-out references (``reference_dataset()``, ``reference_dataloader()``, ``reference_images()``):
      ``reference_fraction`` of the held-out domain's train normals (drawn by ``seed``); test-time
      methods (the meta-comparer's references, PaDiM/kNN baselines fitted on them) use exactly these.

    Source domains are under ``source_shift``, the held-out domain under ``target_shift``. Images in
    [0, 1], NOT normalised (the model's ``FeatureExtractor`` owns the weights' mean/std). ``domain_index``
    is the position of the domain in ``domains``.

    Args:
        dataset: dataset of the source domains: ``surfaces``, ``mvtec``, ``visa``, ``btad`` or ``folder``.
        root: its folder; ``None`` only for ``surfaces`` (built on first use in ``$SHIFTAD_CACHE``).
        domains: all domains (categories), the held-out one included; ``None`` = every surfaces category.
        held_out: the unseen test domain; must be in ``domains``.
        held_out_dataset: dataset of the held-out domain for cross-dataset runs (e.g. MVTec -> BTAD);
            ``None`` = ``dataset``.
        held_out_root: folder of ``held_out_dataset``; ``None`` = ``root``.
        num_references: normal reference images per training/validation query.
        reference_fraction: fraction of the held-out domain's train normals used as references, 0.1-1.0.
        val_fraction: fraction of the source queries held out for validation.
        image_size: side of the square images fed to the model.
        resize_size: resize to this side, then centre-crop ``image_size``; ``None`` resizes directly.
        batch_size: queries per batch.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split, of every reference draw and of the reference fraction.
        source_shift: shift of the source domains; ``None`` is no shift.
        target_shift: shift of the held-out domain; ``None`` is no shift.
        style_reference: style photograph replacing the default one of ``fda``/``histmatch``/``pda``.
    """

    def __init__(
        self,
        dataset: str = "surfaces",
        root: str | None = None,
        domains: list[str] | None = None,
        held_out: str = "wood",
        held_out_dataset: str | None = None,
        held_out_root: str | None = None,
        num_references: int = 4,
        reference_fraction: float = 1.0,
        val_fraction: float = 0.1,
        image_size: int = 256,
        resize_size: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        source_shift: str | None = None,
        target_shift: str | None = None,
        style_reference: str | None = None,
    ) -> None:
        super().__init__(dataset, root, image_size, resize_size, batch_size, num_workers, seed, source_shift,
                         target_shift, style_reference)
        self.save_hyperparameters()
        if domains is None:
            if dataset != "surfaces":
                raise ValueError(f"dataset={dataset!r} needs domains=[...] (e.g. MVTec carpet, grid, leather, tile, "
                                 "wood); only 'surfaces' has a default domain list")
            domains = list(SURFACES_CATEGORIES)
        self.domains = list(domains)
        if held_out not in self.domains:
            raise ValueError(f"held_out={held_out!r} is not in domains {self.domains}")
        if len(set(self.domains)) != len(self.domains) or len(self.domains) < 2:
            raise ValueError(f"domains must be at least two distinct names, got {self.domains}")
        if not 0.1 <= reference_fraction <= 1.0:
            raise ValueError(f"reference_fraction must be in [0.1, 1.0], got {reference_fraction}")
        if num_references < 1:
            raise ValueError(f"num_references must be >= 1, got {num_references}")
        self.held_out = held_out
        self.source_domains = [d for d in self.domains if d != held_out]
        self.held_out_dataset = held_out_dataset or dataset
        same_source = held_out_root is None and self.held_out_dataset == dataset
        self.held_out_root: Path = self.root if same_source else resolve_root(self.held_out_dataset, held_out_root)
        self.num_references = num_references
        self.reference_fraction = reference_fraction
        self.val_fraction = val_fraction
        check_source(dataset, self.root, self.source_domains)
        check_source(self.held_out_dataset, self.held_out_root, [held_out])

    def prepare_data(self) -> None:
        super().prepare_data()
        if self.held_out_dataset == "surfaces" and self.held_out_root != self.root:
            ensure_surfaces(self.held_out_root)

    def _build(self) -> None:
        queries, val_queries = [], []
        for domain in self.source_domains:
            samples = self._read(domain)
            train, val, _ = stratified_split(samples.train + samples.test, lambda s: s.defect_type,
                                             self.val_fraction, 0.0, self.seed, "lodo-val", domain)
            queries += train
            val_queries += val
        normals = [s for s in queries if s.label == 0]
        held = self._read(self.held_out, self.held_out_dataset, self.held_out_root)
        references = draw_fraction(held.train, self.reference_fraction, self.seed, "references", self.held_out)

        source = self._dataset(normals, self.domains, self.source_shift)
        self.train_dataset = EpisodeDataset(self._dataset(queries, self.domains, self.source_shift), source,
                                            self.num_references, self.seed, "train")
        self.val_dataset = EpisodeDataset(self._dataset(val_queries, self.domains, self.source_shift), source,
                                          self.num_references, self.seed, "val")
        if len(self.train_dataset) < self.batch_size:
            raise ValueError(f"{len(self.train_dataset)} training queries are fewer than batch_size={self.batch_size}; "
                             "with drop_last=True there would be no batch")
        self.test_dataset = self._dataset(held.test, self.domains, self.target_shift)
        self._reference_dataset = self._dataset(references, self.domains, self.target_shift)

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._train_loader(self.train_dataset, drop_last=True, epoch_keys=True)

    def reference_dataset(self) -> AnomalyDataset:
        """The held-out domain's reference normals (``reference_fraction`` of its train normals)."""
        self._require_setup()
        return self._reference_dataset

    def reference_dataloader(self) -> DataLoader:
        """The held-out references as batches of sample dicts, in a fixed order."""
        return self._loader(self.reference_dataset())

    def reference_images(self) -> torch.Tensor:
        """The held-out references stacked: float32 ``[N, 3, H, W]`` in [0, 1]."""
        return torch.cat([batch["image"] for batch in self.reference_dataloader()])

    def describe(self) -> Description:
        return {**super().describe(), "domains": ",".join(self.domains), "held_out": self.held_out,
                "held_out_dataset": self.held_out_dataset, "reference_fraction": self.reference_fraction,
                "num_references": self.num_references, "shots": None, "fold": None}

    @property
    def run_tag(self) -> str:
        datasets = self.dataset if self.held_out_dataset == self.dataset else f"{self.dataset}-to-{self.held_out_dataset}"
        shifts = "" if self.source_shift == self.target_shift == "none" else f"{self.source_shift}-to-{self.target_shift}"
        return safe_tag(datasets, "lodo", self.held_out, f"ref{round(self.reference_fraction * 100)}", shifts)

