"""Write a PNG grid of an embedded dataset: one row per category, one column per shift.

    python -m datamodules.preview --out docs/surfaces_preview.png
    python -m datamodules.preview --dataset surfaces_line_b --out docs/surfaces_line_b_preview.png

Each cell is a defective test image (the defect type changes from row to row) as the model receives it
under that shift, with its ground-truth mask outlined in yellow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from datamodules.dataset import AnomalyDataset
from datamodules.readers import read_category
from datamodules.shifts import SHIFT_NAMES, Shift
from datamodules.surfaces import (
    DEFECT_TYPES,
    EMBEDDED_DATASETS,
    SURFACES_CATEGORIES,
    default_embedded_root,
    ensure_embedded,
)

OUTLINE_RGB = (255, 230, 0)
LABEL_HEIGHT = 18
LABEL_WIDTH = 130


def _cell(dataset: AnomalyDataset, index: int) -> np.ndarray:
    item = dataset[index]
    image = np.ascontiguousarray((item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    contours, _ = cv2.findContours(item["mask"][0].numpy().astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, OUTLINE_RGB, 1)
    return image


def _label(text: str, width: int, height: int) -> np.ndarray:
    canvas = np.full((height, width, 3), 255, np.uint8)
    (_, text_height), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    baseline_y = (height + text_height) // 2
    cv2.putText(canvas, text, (3, baseline_y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def preview_grid(root: Path, shifts: list[str], image_size: int, dataset: str = "surfaces") -> np.ndarray:
    """RGB uint8 grid: a header row of shift names, then one row per category of the build at ``root``."""
    categories = [c for c in SURFACES_CATEGORIES if (root / c).is_dir()]
    rows = [np.concatenate([_label("", LABEL_WIDTH, LABEL_HEIGHT)]
                           + [_label(shift, image_size, LABEL_HEIGHT) for shift in shifts], 1)]
    for row, category in enumerate(categories):
        test = read_category(dataset, root, category).test
        kind = DEFECT_TYPES[row % len(DEFECT_TYPES)]
        index = next(i for i, s in enumerate(test) if s.defect_type == kind)
        cells = [_cell(AnomalyDataset(test, [category], Shift(shift), image_size), index) for shift in shifts]
        rows.append(np.concatenate([_label(f"{category}/{kind}", LABEL_WIDTH, image_size)] + cells, 1))
    return np.concatenate(rows, 0)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="PNG grid of an embedded dataset's categories x domain shifts")
    parser.add_argument("--out", default="docs/surfaces_preview.png", help="PNG file to write")
    parser.add_argument("--dataset", default="surfaces", choices=EMBEDDED_DATASETS)
    parser.add_argument("--root", default=None, help="its folder (default: the default build in the cache)")
    parser.add_argument("--shifts", nargs="+", default=list(SHIFT_NAMES))
    parser.add_argument("--image-size", type=int, default=100)
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else default_embedded_root(args.dataset)
    ensure_embedded(args.dataset, root)
    grid = preview_grid(root, args.shifts, args.image_size, args.dataset)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"could not write {out}")
    print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]} px)")
    return out


if __name__ == "__main__":
    main()
