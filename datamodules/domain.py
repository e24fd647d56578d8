"""The domain spec shared by every DataModule: which images (dataset, folder, categories) under which shift.

A synthetic shift is the target ``{shift: gray}`` on the source's images; a real second domain is the target
``{root: /data/lineB}`` (category inherited) or ``{dataset: surfaces_line_b}``. Resolution fills what a
target leaves unset from the source: ``dataset``, ``category``, and ``root`` when the dataset is the
source's. ``shift`` is never inherited: unset is no shift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.readers import DATASETS, CategorySamples, check_categories, check_dataset_name, read_category
from datamodules.shifts import check_shift_name
from datamodules.surfaces import (
    EMBEDDED_DATASETS,
    SURFACES_CATEGORIES,
    default_embedded_root,
    ensure_embedded,
    is_built,
)


@dataclass(frozen=True)
class Domain:
    """One domain as given in a config; unset fields are resolved (see the module docstring).

    Args:
        dataset: ``surfaces``, ``surfaces_line_b`` (embedded, built on first use), ``mvtec``, ``visa``,
            ``btad`` or ``folder`` (any dataset in MVTec AD layout).
        root: the dataset's folder; ``None`` only for the embedded datasets (their build in ``$SHIFTAD_CACHE``).
        category: one category, or a list of categories pooled together.
        shift: synthetic shift applied on top of the images (``gray``, ``coljit``, ``fda``, ...); ``None`` is none.
        name: LODO only: the domain's name (default: its category).
    """

    dataset: str | None = None
    root: str | None = None
    category: str | list[str] | None = None
    shift: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        # jsonargparse (4.53) passes `--data.init_args.source.shift null` as the string "None" in a DataModule's
        # nested dataclass; no dataset, folder, category, shift or name is called that.
        for field in dataclasses.fields(self):
            if getattr(self, field.name) == "None":
                object.__setattr__(self, field.name, None)


DomainArg = Domain | dict | None
DOMAIN_KEYS = {field.name for field in dataclasses.fields(Domain)}
#: a target that sets nothing: the source's images without a shift
UNSET = Domain()


def as_domain(value: DomainArg) -> Domain:
    """A ``Domain`` from itself, a plain dict (checkpoint hyperparameters, Python calls) or ``None``."""
    if value is None:
        return UNSET
    if isinstance(value, Domain):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - DOMAIN_KEYS)
        if unknown:
            raise ValueError(f"unknown domain key(s) {unknown}; a domain has dataset, root, category, shift, name")
        return Domain(**value)
    raise TypeError(f"a domain is a Domain or a dict of dataset/root/category/shift/name, got {value!r}")


def plain(value):
    """``value`` with every ``Domain`` (or a dict of one, as LightningCLI hands them over) turned into a clean dict:
    checkpoints store plain hyperparameters, loadable with ``torch.load(weights_only=True)``."""
    if isinstance(value, Domain) or (isinstance(value, dict) and value and set(value) <= DOMAIN_KEYS):
        return dataclasses.asdict(as_domain(value))
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ResolvedDomain:
    """A fully filled domain: dataset, folder, categories and shift name (``"none"`` for no shift).

    ``role`` (``source``, ``target``, ``domain 'wood'``) only names the domain in messages.
    """

    dataset: str
    root: Path
    categories: tuple[str, ...]
    shift: str
    role: str = dataclasses.field(default="domain", compare=False)
    name: str | None = None

    @property
    def embedded(self) -> bool:
        return self.dataset in EMBEDDED_DATASETS

    @property
    def category(self) -> str:
        """The single category (Paired and LODO domains have one)."""
        if len(self.categories) != 1:
            raise ValueError(f"{self.role}: needs exactly one category, got {list(self.categories)}")
        return self.categories[0]

    def same_folder_as(self, other: ResolvedDomain) -> bool:
        return self.dataset == other.dataset and _canonical(self.root) == _canonical(other.root)

    def same_images_as(self, other: ResolvedDomain) -> bool:
        return self.same_folder_as(other) and self.categories == other.categories

    def changed_fields(self, other: ResolvedDomain) -> list[str]:
        """The config fields (``dataset``, ``root``, ``category``, ``shift``) in which ``other`` differs, compared
        as resolved: other spellings of the same thing (``shift: none``, a one-item category list, an inherited
        value given again) agree."""
        same = {"dataset": self.dataset == other.dataset, "root": _canonical(self.root) == _canonical(other.root),
                "category": self.categories == other.categories, "shift": self.shift == other.shift}
        return [field for field, equal in same.items() if not equal]

    def folder_tag(self, other: ResolvedDomain) -> str:
        """This domain's folder in a run tag next to ``other``'s: its dataset, with the folder's name when the
        two are the same dataset in different folders."""
        if self.dataset != other.dataset or self.same_folder_as(other):
            return self.dataset
        return f"{self.dataset}_{self.root.name}"

    def where(self, message: str = "") -> str:
        """The domain's role, with its dataset and folder unless ``message`` names the folder already."""
        if str(self.root) in message:
            return f"{self.role} domain"
        return f"{self.role} domain ({self.dataset} at {str(self.root)!r})"

    @contextmanager
    def naming(self) -> Iterator[None]:
        """Errors raised inside name this domain, its dataset and folder."""
        try:
            yield
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"{self.where(str(error))}: {error}") from error

    def read(self, category: str) -> CategorySamples:
        with self.naming():
            return read_category(self.dataset, self.root, category)

    def check(self) -> None:
        """Fail fast (no image scan) on a missing or empty root or a missing category; an embedded root that
        is not built yet is built by ``prepare_data``."""
        if self.embedded and not is_built(self.root):
            unknown = [c for c in self.categories if c not in SURFACES_CATEGORIES]
            if unknown:
                raise ValueError(f"{self.role}: unknown {self.dataset} category {unknown}; "
                                 f"valid: {', '.join(SURFACES_CATEGORIES)}")
            return
        with self.naming():
            if self.embedded:
                ensure_embedded(self.dataset, self.root)  # built: only checks that it is this dataset's line
            if self.root.is_dir() and not any(self.root.iterdir()):
                raise FileNotFoundError(f"the folder {str(self.root)!r} is empty; expected its categories in it "
                                        f"({', '.join(self.categories)})")
            check_categories(self.dataset, self.root, list(self.categories))

    def describe(self) -> str:
        return f"{self.dataset}:{','.join(self.categories)} at {str(self.root)!r} (shift {self.shift})"


def _canonical(root: Path) -> Path:
    return root.expanduser().resolve()


def _categories(category: str | Sequence[str], role: str) -> tuple[str, ...]:
    categories = (category,) if isinstance(category, str) else tuple(category)
    if not categories or len(set(categories)) != len(categories) or not all(isinstance(c, str) for c in categories):
        raise ValueError(f"{role}.category must be one name or a list of distinct names, got {category!r}")
    return categories


def _root(dataset: str, root: str | None, role: str) -> Path:
    if root is not None:
        return Path(root).expanduser()
    if dataset in EMBEDDED_DATASETS:
        return default_embedded_root(dataset)
    raise ValueError(f"{role}.dataset={dataset!r} needs {role}.root=<folder of the dataset>; only "
                     f"{', '.join(EMBEDDED_DATASETS)} are built on demand")


def _dataset(dataset: str | None, role: str, root: str | None = None) -> str:
    """The checked dataset name; an embedded dataset given a folder of other images (``source.root:
    /data/lineA`` with the default ``dataset: surfaces``) reads that folder as ``folder``, the same layout."""
    if dataset is None:
        raise ValueError(f"{role}.dataset is not set; expected one of {', '.join(DATASETS)}")
    try:
        check_dataset_name(dataset)
    except ValueError as error:
        raise ValueError(f"{role}.dataset: {error}") from error
    if dataset in EMBEDDED_DATASETS and root is not None:
        folder = Path(root).expanduser()
        if folder.is_dir() and any(folder.iterdir()) and not is_built(folder):
            rank_zero_info(f"{role}: {str(folder)!r} holds no {dataset} build; it is read as dataset 'folder' "
                           "(MVTec AD layout)")
            return "folder"
    return dataset


def _shift(shift: str | None, role: str) -> str:
    try:
        return check_shift_name(shift)
    except ValueError as error:
        raise ValueError(f"{role}.shift: {error}") from error


def resolve_source(source: DomainArg, role: str = "source", needs_category: bool = True) -> ResolvedDomain:
    """The source domain, everything given (``category`` may be unset where ``needs_category`` is False)."""
    domain = as_domain(source)
    dataset = _dataset(domain.dataset, role, domain.root)
    if domain.category is None and needs_category:
        raise ValueError(f"{role}.category is not set; give the category (or a list of categories)")
    categories = () if domain.category is None else _categories(domain.category, role)
    return ResolvedDomain(dataset, _root(dataset, domain.root, role), categories, _shift(domain.shift, role), role,
                          domain.name)


def resolve_target(target: DomainArg, base: ResolvedDomain, role: str = "target") -> ResolvedDomain:
    """``target`` with ``dataset``, ``category`` and (same dataset only) ``root`` taken from ``base`` where
    unset; its ``shift`` is its own (unset is no shift)."""
    domain = as_domain(target)
    dataset = _dataset(domain.dataset or base.dataset, role, domain.root)
    if domain.root is not None:
        root = Path(domain.root).expanduser()
    elif dataset == base.dataset:
        root = base.root
    else:
        root = _root(dataset, None, role)
    category = domain.category if domain.category is not None else base.categories
    categories = _categories(category, role) if category else ()
    return ResolvedDomain(dataset, root, categories, _shift(domain.shift, role), role, domain.name or base.name)


def is_explicit(target: DomainArg) -> bool:
    """Whether a target names its own images (dataset, root or category), not only a shift."""
    domain = as_domain(target)
    return any(v is not None for v in (domain.dataset, domain.root, domain.category))


def report_shift(source: ResolvedDomain, target: ResolvedDomain, warn_no_shift: bool) -> None:
    """Say when source and target are the same images under the same shift (no domain shift at all; warned
    where ``warn_no_shift``), and when a shift is put on top of a target folder that already differs."""
    if target.same_images_as(source):
        if source.shift == target.shift and warn_no_shift:
            rank_zero_warn(f"source and target are the same images ({source.describe()}) under the same shift: "
                           "there is no domain shift; set target.root/dataset/category to another folder or "
                           "target.shift to a synthetic shift")
    elif target.shift != "none":
        rank_zero_info(f"target: shift {target.shift!r} is applied on top of a target that already differs from "
                       f"the source ({target.describe()} vs {source.describe()})")
