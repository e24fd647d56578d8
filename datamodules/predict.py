"""The images ``predict`` scores: every image file under a folder (recursively), one file, or a glob.

Files are read as the training images are (``datamodules.dataset.read_image``: any size, 8- or 16-bit,
grayscale, palette, RGBA, CMYK -> RGB) and resized as the DataModule's evaluation images. No synthetic
domain shift is applied: they are the user's images as they are. Files without an image extension are
skipped and counted once in the log; an image file that cannot be decoded is named in a warning and
skipped, and the others are still scored.

Item (batched by the default collate): ``image`` float32 ``[3, H, W]`` in [0, 1], ``path`` str,
``original_size`` long ``[2]`` (height, width of the file).
"""

from __future__ import annotations

import glob
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.dataset import build_resize, read_image
from datamodules.readers import IMAGE_EXTENSIONS

PREDICT_PATH_KEY = "data.init_args.predict_path"
_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class PredictFiles:
    """The image files found under ``predict_path`` and the other files passed over.

    ``names``: for each image, the name of its overlay (no extension), unique across the listing: the file's
    stem, or, where stems collide, its path under ``root`` with separators and the extension's dot as ``__``.
    """

    predict_path: str
    root: Path
    images: tuple[str, ...]
    skipped: dict[str, int]  # extension (or "no extension") -> count of files that are not images
    names: dict[str, str]

    def describe(self) -> str:
        text = f"predict_path {self.predict_path!r}: {len(self.images)} image(s)"
        if self.skipped:
            kinds = ", ".join(f"{ext}: {count}" for ext, count in sorted(self.skipped.items()))
            text += (f"; skipped {sum(self.skipped.values())} file(s) that are not images ({kinds}; image "
                     f"extensions are {', '.join(IMAGE_EXTENSIONS)})")
        return text


def is_glob(pattern: str) -> bool:
    return bool(_GLOB_CHARACTERS & set(pattern))


def list_predict_files(predict_path: str) -> PredictFiles:
    """Every file of a folder (recursively), one file, or the files a glob matches (``**`` recursive); only
    files with an image extension are kept. An empty result is an error naming ``predict_path``."""
    expanded = os.path.expanduser(predict_path)
    if is_glob(expanded):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(expanded).parent
        problem = "matches no image file"
    elif os.path.isdir(expanded):
        root = Path(expanded)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        problem = "is a folder with no image file in it or its subfolders"
    elif os.path.isfile(expanded):
        root = Path(expanded).parent
        files = [Path(expanded)]
        problem = "is not an image file"
    else:
        raise FileNotFoundError(f"{PREDICT_PATH_KEY} {predict_path!r} does not exist; expected a folder of images "
                                f"(read recursively), an image file or a glob such as '/data/line_b/**/*.png'")
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = Counter(p.suffix.lower() or "no extension" for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS)
    if not images:
        others = f" (it has {sum(skipped.values())} other file(s))" if skipped and len(files) > 1 else ""
        raise ValueError(f"{PREDICT_PATH_KEY} {predict_path!r} {problem}{others}; expected image files "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    paths = [str(p) for p in images]
    return PredictFiles(predict_path, root, tuple(paths), dict(skipped), overlay_names(images, root))


def overlay_names(images: Sequence[Path], root: Path) -> dict[str, str]:
    """A unique file name (no extension) per image: its stem, or its path under ``root`` where stems collide."""
    stems = Counter(p.stem for p in images)
    names = {}
    for path in images:
        if stems[path.stem] == 1:
            names[str(path)] = path.stem
        else:
            relative = path.relative_to(root) if path.is_relative_to(root) else path
            names[str(path)] = "__".join((*relative.parent.parts, relative.stem, relative.suffix.lstrip(".")))
    return names


class PredictImages(IterableDataset):
    """The images of a listing, each read, resized and yielded once; unreadable ones are skipped.

    An iterable dataset, so that a skipped file leaves no hole in a batch. It shards itself: process ``rank``
    of ``world_size`` takes every ``world_size``-th file, and each of its loader workers a share of those, so
    under DDP every image is scored exactly once (nothing is repeated to even out the processes).

    Args:
        paths: the image files.
        image_size: side of the square output.
        resize_size: if set, resize to this side first and centre-crop ``image_size`` (as the evaluation images).
        rank: this process's rank; world_size: the number of processes.
    """

    def __init__(self, paths: Sequence[str], image_size: int, resize_size: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        self.paths = list(paths)
        self.resize = build_resize(image_size, resize_size)
        self.rank = rank
        self.world_size = world_size

    def shard(self) -> list[str]:
        """The files this process (and loader worker) reads."""
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        return self.paths[self.rank * workers + worker_id::self.world_size * workers]

    def __iter__(self) -> Iterator[dict]:
        for path in self.shard():
            try:
                image = read_image(path)
            except ValueError as error:
                warnings.warn(f"predict: skipped {error}", stacklevel=1)
                continue
            resized = self.resize(image=image)["image"]
            yield {
                "image": torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float().div_(255.0),
                "path": path,
                "original_size": torch.tensor(image.shape[:2], dtype=torch.long),
            }
