"""Tiny datasets written into tmp folders: a surfaces build and fake MVTec AD, VisA and BTAD trees."""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules.surfaces import SurfacesSpec, ensure_surfaces

TINY_SURFACES = SurfacesSpec(image_size=64, train_good=12, test_good=4, test_defects=5)
FAKE_SIZE = (40, 48)  # (H, W): not square, so resizing is exercised
MVTEC_CATEGORIES = ("bottle", "carpet")
MVTEC_DEFECTS = {"scratch": 2, "crack": 2}

# Under pytest-xdist each worker gets its share of the cores: torch's default (all cores per process) would
# make the workers' OpenMP threads wait on each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session", autouse=True)
def subprocess_temp_folder(tmp_path_factory) -> Path:
    """The temp folder of every process the tests start. Some are killed on purpose (a crash, a lost node) and
    cannot remove their temp files (W&B's, made when timm imports it; torchelastic's), so those land under
    pytest's own temp folder, which pytest rotates, instead of piling up in /tmp."""
    folder = tmp_path_factory.mktemp("subprocess_tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        yield folder


def write_image(path: Path, seed: int, size: tuple[int, int] = FAKE_SIZE) -> Path:
    """Random RGB image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path


def write_mask(path: Path, size: tuple[int, int] = FAKE_SIZE, value: int = 255) -> Path:
    """A mask with a ``value`` rectangle in the top-left quarter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[: size[0] // 2, : size[1] // 2] = value
    assert cv2.imwrite(str(path), mask)
    return path


def make_folder_tree(root: Path, categories=MVTEC_CATEGORIES, normal: str = "good", mask_suffix: str = "_mask",
                     ext: str = ".png", train: int = 8, test_good: int = 3, defects=None,
                     with_masks: bool = True) -> Path:
    """An MVTec-AD-style tree (BTAD with ``normal="ok"``, ``mask_suffix=""``, ``ext=".bmp"``)."""
    defects = MVTEC_DEFECTS if defects is None else defects
    seed = 0
    for category in categories:
        for i in range(train):
            seed += 1
            write_image(root / category / "train" / normal / f"{i:03d}{ext}", seed)
        for i in range(test_good):
            seed += 1
            write_image(root / category / "test" / normal / f"{i:03d}{ext}", seed)
        for defect, count in defects.items():
            for i in range(count):
                seed += 1
                write_image(root / category / "test" / defect / f"{i:03d}{ext}", seed)
                if with_masks:
                    write_mask(root / category / "ground_truth" / defect / f"{i:03d}{mask_suffix}.png")
    return root


def make_visa_tree(root: Path, objects=("candle", "pcb1"), train: int = 8, test_good: int = 3,
                   test_bad: int = 3) -> Path:
    """VisA layout with ``split_csv/1cls.csv``; masks hold the value 3 to exercise binarisation (> 0)."""
    rows = []
    seed = 100
    for obj in objects:
        for split, label, count in (("train", "normal", train), ("test", "normal", test_good),
                                    ("test", "anomaly", test_bad)):
            for i in range(count):
                seed += 1
                folder = "Normal" if label == "normal" else "Anomaly"
                image = f"{obj}/Data/Images/{folder}/{split}_{i:04d}.JPG"
                write_image(root / image, seed)
                mask = ""
                if label == "anomaly":
                    mask = f"{obj}/Data/Masks/Anomaly/{split}_{i:04d}.png"
                    write_mask(root / mask, value=3)
                rows.append({"object": obj, "split": split, "label": label, "image": image, "mask": mask})
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def surfaces_root(tmp_path_factory) -> Path:
    return ensure_surfaces(tmp_path_factory.mktemp("surfaces") / "tiny", TINY_SURFACES)


@pytest.fixture(scope="session")
def context(surfaces_root, tmp_path_factory) -> dict:
    """What some cases of ``tests/methods.py`` need from others: a CS-Flow phase-1 checkpoint for phase 2."""
    from cli import main
    from tests.methods import CASES, fit_args, last_checkpoint

    runs = tmp_path_factory.mktemp("case_context")
    csflow = next(case for case in CASES if case.name == "csflow")
    main(["fit", *fit_args(csflow, surfaces_root, runs, {})])
    return {"csflow_source": last_checkpoint(runs, csflow)}


@pytest.fixture(scope="session")
def surfaces_line_b_root(tmp_path_factory) -> Path:
    """A tiny build of the second production line (``surfaces_line_b``): other images of the same materials."""
    spec = dataclasses.replace(TINY_SURFACES, line="b")
    return ensure_surfaces(tmp_path_factory.mktemp("surfaces_line_b") / "tiny_b", spec)


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    return make_folder_tree(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="session")
def visa_root(tmp_path_factory) -> Path:
    return make_visa_tree(tmp_path_factory.mktemp("visa"))


@pytest.fixture(scope="session")
def btad_root(tmp_path_factory) -> Path:
    return make_folder_tree(tmp_path_factory.mktemp("btad"), categories=("01", "02"), normal="ok", mask_suffix="",
                            ext=".bmp", defects={"ko": 3})


@pytest.fixture
def make_mvtec(tmp_path) -> Callable[..., Path]:
    """Factory for a fresh, modifiable MVTec-style tree under this test's tmp folder."""
    return lambda **kwargs: make_folder_tree(tmp_path / "mvtec", **kwargs)
