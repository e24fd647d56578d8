"""Leave-one-domain-out episodes for domain-generalised anomaly detection (paper 002)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import Description, ShiftADDataModule, safe_tag
from datamodules.dataset import AnomalyDataset
from datamodules.domain import UNSET, Domain, ResolvedDomain, as_domain, report_shift, resolve_target
from datamodules.one_class import TRAIN_ON, TrainOn
from datamodules.readers import CategorySamples, Sample
from datamodules.shifts import Shift
from datamodules.splits import draw_fraction, draw_shots, hold_out, rng_for, stratified_split
from datamodules.surfaces import SURFACES_CATEGORIES

SOURCE_DEFAULT = Domain(dataset="surfaces")
#: where the test-time references come from: OneClassDataModule's ``train_on`` choices
REFERENCES_FROM: tuple[str, ...] = TRAIN_ON
_REFERENCES_TAGS = {"source": "refs-source", "target_shots": "refs-shots",
                    "source+target_shots": "refs-source+shots"}

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


class _Entry(NamedTuple):
    """One entry of LODO's ``domains``: its name, whether it was a full ``Domain``, and where its images are."""

    name: str
    full: bool
    resolved: ResolvedDomain


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
    - Test (``test_dataloader``, named ``("target",)``): the held-out domain's test images as plain sample
      dicts.
    - Test-time references (``reference_dataset()``, ``reference_dataloader()``, ``reference_images()``),
      chosen by ``references_from``: ``target`` (``reference_fraction`` of the held-out domain's train
      normals, drawn by ``seed``), ``target_shots`` (k of them), ``source`` (the source domains' train
      normals, pooled) or ``source+target_shots`` (both). Test-time methods (the meta-comparer's
      references, PaDiM/kNN baselines fitted on them) use exactly these. The k shots of fold f are
      ``OneClassDataModule``'s target shots of the same ``val_fraction``, k, fold, ``num_folds`` and seed: the
      held-out domain's train normals minus a ``val_fraction`` hold-out, cut into ``num_folds`` disjoint
      chunks by ``draw_shots``.

    Each entry of ``domains`` is a name, a category of ``source``'s dataset and folder under its shift, or a
    full ``Domain`` with its own dataset, root, one category and shift (named ``name``, default its
    category), so that e.g. MVTec textures, a BTAD product and a user folder are one list. The held-out
    domain is its entry overridden by ``target``'s set fields; its shift is ``target.shift``, else a full
    entry's own, else none (a source shift does not carry over). Images in [0, 1], NOT normalised (the
    model's ``FeatureExtractor`` owns the weights' mean/std). ``domain_index`` is the position of the
    domain in ``domains``.

    Args:
        source: dataset, root and shift of the name entries of ``domains`` (no category).
        target: overrides of the held-out domain (cross-dataset: ``{dataset: btad, root: /data/btad}``).
        domains: all domains, the held-out one included; ``None`` = every category of the embedded source.
        held_out: the name of the unseen test domain; must be in ``domains``.
        num_references: normal reference images per training/validation query.
        reference_fraction: fraction of the held-out domain's train normals used as references, 0.1-1.0
            (``references_from=target`` only).
        val_fraction: fraction of the source queries held out for validation (and of the held-out domain's
            train normals left out of the shot pool, as in ``OneClassDataModule``).
        image_size: side of the square images fed to the model.
        resize_size: resize to this side, then centre-crop ``image_size``; ``None`` resizes directly.
        batch_size: queries per batch.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split, of every reference draw and of the reference fraction.
        style_reference: style photograph replacing the default one of ``fda``/``histmatch``/``pda``.
        predict_path: the images ``predict`` scores: a folder (recursive), an image file or a glob.
        references_from: ``target``, ``target_shots``, ``source`` or ``source+target_shots``.
        target_shots: k, the number of held-out normal images used as references (the ``*target_shots`` choices).
        fold: cross-validation fold of the shot draw, in [0, num_folds).
        num_folds: number of disjoint shot folds.
    """

    test_dataloader_names = ("target",)

    def __init__(
        self,
        source: Domain = SOURCE_DEFAULT,
        target: Domain = UNSET,
        domains: list[str | Domain] | None = None,
        held_out: str = "wood",
        num_references: int = 4,
        reference_fraction: float = 1.0,
        val_fraction: float = 0.1,
        image_size: int = 256,
        resize_size: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        style_reference: str | None = None,
        predict_path: str | None = None,
        references_from: TrainOn = "target",
        target_shots: int | None = None,
        fold: int = 0,
        num_folds: int = 5,
    ) -> None:
        super().__init__(source, image_size, resize_size, batch_size, num_workers, seed, style_reference,
                         source_needs_category=False, predict_path=predict_path)
        self.save_hyperparameters()
        if self.source.categories:
            raise ValueError(f"LODO takes its domains from domains=[...], not source.category "
                             f"({list(self.source.categories)}); leave source.category unset")
        if domains is None:
            if not self.source.embedded:
                raise ValueError(f"source.dataset={self.source.dataset!r} needs domains=[...] (e.g. MVTec carpet, "
                                 "grid, leather, tile, wood); only the embedded datasets have a default domain list")
            domains = list(SURFACES_CATEGORIES)
        entries = {}
        for entry in domains:
            domain = self._entry(entry)
            if domain.name in entries:
                raise ValueError(f"domains must have distinct names, {domain.name!r} is there twice")
            entries[domain.name] = domain
        self.domains = list(entries)
        if held_out not in self.domains:
            raise ValueError(f"held_out={held_out!r} is not in domains {self.domains}")
        if len(self.domains) < 2:
            raise ValueError(f"domains must be at least two distinct names, got {self.domains}")
        if not 0.1 <= reference_fraction <= 1.0:
            raise ValueError(f"reference_fraction must be in [0.1, 1.0], got {reference_fraction}")
        if num_references < 1:
            raise ValueError(f"num_references must be >= 1, got {num_references}")
        if references_from not in REFERENCES_FROM:
            raise ValueError(f"references_from must be one of {', '.join(REFERENCES_FROM)}, got {references_from!r}")
        if references_from != "target" and reference_fraction != 1.0:
            raise ValueError(f"reference_fraction={reference_fraction} applies to references_from=target only, "
                             f"got references_from={references_from!r}; leave it at 1.0")
        with_shots = "target_shots" in references_from
        if with_shots and target_shots is None:
            raise ValueError(f"references_from={references_from!r} needs target_shots (k, e.g. 1, 5 or 10)")
        if not with_shots and target_shots is not None:
            raise ValueError(f"target_shots={target_shots} is used only by references_from=target_shots or "
                             f"source+target_shots, got references_from={references_from!r}")
        if target_shots is not None and target_shots < 1:
            raise ValueError(f"target_shots must be >= 1, got {target_shots}")
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in [0, num_folds={num_folds}), got {fold}")
        self.held_out = held_out
        self.source_domains = [entries[name] for name in self.domains if name != held_out]
        given = as_domain(target)
        entry = entries[held_out]
        shift = given.shift if given.shift is not None else (entry.resolved.shift if entry.full else None)
        self.target = dataclasses.replace(
            resolve_target(dataclasses.replace(given, shift=shift), entry.resolved), name=held_out)
        self.held_out_dataset = self.target.dataset
        self.num_references = num_references
        self.reference_fraction = reference_fraction
        self.val_fraction = val_fraction
        self.references_from = references_from
        self.target_shots = target_shots
        self.fold = fold
        self.num_folds = num_folds
        for domain in self.source_domains:
            domain.resolved.check()
        self.target.check()
        if self.target_is_other_folder():
            report_shift(self.source, self.target, warn_no_shift=False)

    def _entry(self, entry: str | Domain | dict) -> _Entry:
        """One ``domains`` entry resolved: a name is a category of the source's folder under its shift."""
        if isinstance(entry, str):
            resolved = dataclasses.replace(self.source, categories=(entry,), role=f"domain {entry!r}", name=entry)
            return _Entry(entry, False, resolved)
        spec = as_domain(entry)
        category = spec.category if isinstance(spec.category, str) else None
        name = spec.name or category
        if name is None:
            raise ValueError(f"domain entry {entry!r} needs one category (and optionally a name)")
        resolved = resolve_target(spec, self.source, role=f"domain {name!r}")
        return _Entry(name, True, dataclasses.replace(resolved, name=name))

    def domains_read(self) -> list[ResolvedDomain]:
        return [domain.resolved for domain in self.source_domains] + [self.target]

    def target_is_other_folder(self) -> bool:
        return not self.target.same_folder_as(self.source)

    def _samples(self, domain: ResolvedDomain) -> CategorySamples:
        """The domain's samples, named by the domain (a full entry may rename its category)."""
        samples = domain.read(domain.category)
        if domain.name == domain.category:
            return samples
        return CategorySamples(*([dataclasses.replace(s, domain=domain.name) for s in split]
                                 for split in (samples.train, samples.test)))

    def _build(self) -> None:
        queries, val_queries, normals, source_references = [], [], [], []
        for entry in self.source_domains:
            domain = entry.resolved
            samples = self._samples(domain)
            source_references.append((samples.train, domain.shift))
            train, val, _ = stratified_split(samples.train + samples.test, lambda s: s.defect_type,
                                             self.val_fraction, 0.0, self.seed, "lodo-val", entry.name)
            queries.append((train, domain.shift))
            val_queries.append((val, domain.shift))
            normals.append(([s for s in train if s.label == 0], domain.shift))
        held = self._samples(self.target)
        references = source_references if "source" in self.references_from else []
        if self.references_from == "target":
            references = [(draw_fraction(held.train, self.reference_fraction, self.seed, "references", self.held_out),
                           self.target.shift)]
        elif "target_shots" in self.references_from:
            references = references + [(self._shots(held.train), self.target.shift)]

        source = self._pooled(normals)
        self.train_dataset = EpisodeDataset(self._pooled(queries), source, self.num_references, self.seed, "train")
        self.val_dataset = EpisodeDataset(self._pooled(val_queries), source, self.num_references, self.seed, "val")
        if len(self.train_dataset) < self.batch_size:
            raise ValueError(f"{len(self.train_dataset)} training queries are fewer than batch_size={self.batch_size}; "
                             "with drop_last=True there would be no batch")
        self.test_dataset = self._dataset(held.test, self.domains, self.target.shift)
        self._reference_dataset = self._pooled(references)

    def _shots(self, train: list[Sample]) -> list[Sample]:
        """Fold ``fold``'s k held-out normals, drawn as ``OneClassDataModule`` draws its target shots."""
        category = self.target.category
        with self.target.naming():
            pool, _ = hold_out(train, self.val_fraction, self.seed, "val", category)
            return draw_shots(pool, self.target_shots, self.fold, self.num_folds, self.seed, category)

    def _pooled(self, parts: list[tuple[list[Sample], str]]) -> AnomalyDataset:
        """The samples of several domains in one dataset, each domain under its own shift."""
        samples = [s for part, _ in parts for s in part]
        shifts = {shift for _, shift in parts}
        if len(shifts) == 1:
            return self._dataset(samples, self.domains, shifts.pop())
        by_domain = {s.domain: Shift(shift, self.style_reference) for part, shift in parts for s in part}
        return AnomalyDataset(samples, self.domains, by_domain, self.image_size, self.resize_size)

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._train_loader(self.train_dataset, drop_last=True, epoch_keys=True)

    def reference_dataset(self) -> AnomalyDataset:
        """The test-time reference normals (``references_from``)."""
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
                "num_references": self.num_references, "references_from": self.references_from,
                "shots": self.target_shots, "fold": self.fold if self.target_shots is not None else None}

    @property
    def run_tag(self) -> str:
        source, target = self.source, self.target
        datasets = (source.dataset if target.same_folder_as(source)
                    else f"{source.dataset}-to-{target.folder_tag(source)}")
        shifts = "" if source.shift == target.shift == "none" else f"{source.shift}-to-{target.shift}"
        references = (f"ref{round(self.reference_fraction * 100)}" if self.references_from == "target"
                      else _REFERENCES_TAGS[self.references_from])
        shots = f"k{self.target_shots}-f{self.fold}" if self.target_shots is not None else ""
        return safe_tag(datasets, "lodo", self.held_out, references, shifts, shots)

