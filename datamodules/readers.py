"""Readers that turn datasets on disk into lists of samples, checking the layout as they go.

Supported layouts (``dataset`` argument of the DataModules):

- ``mvtec``, ``folder``, ``surfaces`` and ``surfaces_line_b``: ``<root>/<category>/train/good/*``, ``test/<good|defect>/*``,
  ``ground_truth/<defect>/<stem>_mask.*``. ``folder`` is any user dataset in this layout.
- ``btad``: ``<root>/<01|02|03>/train/ok/*``, ``test/<ok|ko>/*``, ``ground_truth/ko/<stem>.*``
  (images are ``.bmp`` in the originals).
- ``visa``: the official split file ``<root>/split_csv/1cls.csv`` with columns object, split, label,
  image, mask; paths in it are relative to ``<root>``; masks are binarised (> 0).

A folder-layout category without ``ground_truth/`` is valid: its samples have ``has_mask=False`` and
only image-level metrics can be computed. When ``ground_truth/`` exists, every defect image needs a mask
and every mask needs an image, matched by file stem.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("surfaces", "surfaces_line_b", "mvtec", "visa", "btad", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_TYPE = "good"
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


@dataclass(frozen=True)
class Sample:
    """One image on disk with its annotations. ``defect_type`` is ``"good"`` for normal images."""

    image_path: str
    label: int
    defect_type: str
    domain: str
    mask_path: str | None = None
    has_mask: bool = False


@dataclass(frozen=True)
class CategorySamples:
    """The official splits of one category: ``train`` holds normals only, ``test`` normals and defects."""

    train: list[Sample]
    test: list[Sample]


@dataclass(frozen=True)
class _FolderLayout:
    normal_dir: str  # name of the normal class folder in train/ and test/
    mask_suffix: str  # mask file stem = image stem + suffix


_FOLDER_LAYOUTS = {
    "mvtec": _FolderLayout(normal_dir="good", mask_suffix="_mask"),
    "folder": _FolderLayout(normal_dir="good", mask_suffix="_mask"),
    "surfaces": _FolderLayout(normal_dir="good", mask_suffix="_mask"),
    "surfaces_line_b": _FolderLayout(normal_dir="good", mask_suffix="_mask"),
    "btad": _FolderLayout(normal_dir="ok", mask_suffix=""),
}


def expected_layout(dataset: str) -> str:
    """One line describing the folder layout a dataset reader expects."""
    if dataset == "visa":
        return (f"<root>/{VISA_SPLIT_CSV.as_posix()} with columns {','.join(VISA_COLUMNS)} and the image/mask "
                "paths it lists, relative to <root>")
    return f"<root>/{_layout_of(_FOLDER_LAYOUTS[dataset])}"


def check_dataset_name(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets are: {', '.join(DATASETS)}")


def check_categories(dataset: str, root: Path, categories: list[str]) -> None:
    """Cheap existence checks (no image scan): the root, the VisA split file, each category."""
    check_dataset_name(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} root {str(root)!r} does not exist; expected {expected_layout(dataset)}")
    if dataset == "visa":
        available = sorted({row["object"] for row in _read_visa_rows(root)})
    else:
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
    missing = [c for c in categories if c not in available]
    if missing:
        raise FileNotFoundError(
            f"{dataset} category {', '.join(map(repr, missing))} not found under {str(root)!r}; "
            f"available: {', '.join(available) or 'none'}; expected {expected_layout(dataset)}"
        )


def read_category(dataset: str, root: Path, category: str) -> CategorySamples:
    """All samples of one category of a dataset, with layout checks."""
    check_categories(dataset, root, [category])
    if dataset == "visa":
        return _read_visa_category(root, category)
    return _read_folder_category(root / category, category, _FOLDER_LAYOUTS[dataset])


def _layout_of(layout: _FolderLayout) -> str:
    return (f"<category>/train/{layout.normal_dir}/*, test/<{layout.normal_dir}|defect>/* and optionally "
            f"ground_truth/<defect>/<stem>{layout.mask_suffix}.*")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_folder_category(category_dir: Path, category: str, layout: _FolderLayout) -> CategorySamples:
    train_dir = category_dir / "train" / layout.normal_dir
    test_dir = category_dir / "test"
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"missing folder {str(folder)!r}; expected {_layout_of(layout)}")
    gt_dir = category_dir / "ground_truth"
    has_gt = gt_dir.is_dir()

    test_images: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        test_images[class_dir.name] = _list_images(class_dir)
    masks = _match_masks(gt_dir, test_images, layout) if has_gt else {}

    train = [Sample(str(p), 0, NORMAL_TYPE, category, has_mask=has_gt) for p in _list_images(train_dir)]
    test = []
    for class_name, images in test_images.items():
        is_normal = class_name == layout.normal_dir
        for path in images:
            mask = None if is_normal else masks.get(path)
            if has_gt and not is_normal and mask is None:
                raise FileNotFoundError(
                    f"defect image {str(path)!r} has no mask; expected "
                    f"{str(gt_dir / class_name / (path.stem + layout.mask_suffix))}.<ext>"
                )
            test.append(Sample(str(path), 0 if is_normal else 1, NORMAL_TYPE if is_normal else class_name,
                               category, str(mask) if mask else None, has_gt))
    for name, split in (("train", train), ("test", test)):
        if not split:
            raise ValueError(f"empty {name} split: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                             f"{str(train_dir if name == 'train' else test_dir)!r}")
    return CategorySamples(train, test)


def _match_masks(gt_dir: Path, test_images: dict[str, list[Path]], layout: _FolderLayout) -> dict[Path, Path]:
    """Map each defect image to its mask by stem; a mask without an image is an error."""
    matched: dict[Path, Path] = {}
    for defect_dir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
        by_stem = {p.stem: p for p in test_images.get(defect_dir.name, [])}
        for mask in _list_images(defect_dir):
            stem = mask.stem
            if layout.mask_suffix and stem.endswith(layout.mask_suffix):
                stem = stem[: -len(layout.mask_suffix)]
            image = by_stem.get(stem)
            if image is None:
                raise FileNotFoundError(
                    f"mask {str(mask)!r} has no matching image: expected "
                    f"{str(gt_dir.parent / 'test' / defect_dir.name / stem)}.<ext>"
                )
            matched[image] = mask
    return matched


def _read_visa_rows(root: Path) -> list[dict[str, str]]:
    csv_path = root / VISA_SPLIT_CSV
    if not csv_path.is_file():
        raise FileNotFoundError(f"VisA split file {str(csv_path)!r} not found; expected {expected_layout('visa')}")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{str(csv_path)!r} lacks column(s) {', '.join(missing)}; "
                             f"expected columns {', '.join(VISA_COLUMNS)}")
        return list(reader)


def _read_visa_category(root: Path, category: str) -> CategorySamples:
    csv_path = root / VISA_SPLIT_CSV
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    for line, row in enumerate(_read_visa_rows(root), start=2):
        if row["object"] != category:
            continue
        where = f"{str(csv_path)!r} line {line}"
        if row["split"] not in splits or row["label"] not in ("normal", "anomaly"):
            raise ValueError(f"{where}: split must be train|test and label normal|anomaly, got "
                             f"split={row['split']!r} label={row['label']!r}")
        image = root / row["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {str(image)!r} does not exist")
        is_anomaly = row["label"] == "anomaly"
        if is_anomaly and row["split"] == "train":
            raise ValueError(f"{where}: anomalous image in the train split; one-class training needs normals only")
        mask = root / row["mask"] if row["mask"].strip() else None
        if is_anomaly and mask is None:
            raise ValueError(f"{where}: anomalous image {str(image)!r} has no mask")
        if mask is not None and not mask.is_file():
            raise FileNotFoundError(f"{where}: mask {str(mask)!r} does not exist")
        splits[row["split"]].append(Sample(str(image), int(is_anomaly), "anomaly" if is_anomaly else NORMAL_TYPE,
                                           category, str(mask) if mask else None, True))
    for name, samples in splits.items():
        if not samples:
            raise ValueError(f"empty {name} split: {str(csv_path)!r} lists no {name} images of {category!r}")
    return CategorySamples(splits["train"], splits["test"])
