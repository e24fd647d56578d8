"""``predict`` on a folder: the listing and reading of any image file, the CSV and overlay writer, every method
through ``cli.py`` (one process, and two under DDP), and each bad input by its message."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from callbacks.predictions import COLUMNS, PredictionWriter
from cli import ConfigError, main
from datamodules import Domain, OneClassDataModule
from datamodules.predict import PREDICT_PATH_KEY, PredictImages, list_predict_files
from lightning_modules.components.calibration import ScoreCalibration, ThresholdSpec, prediction
from tests.methods import CASES, QUIET, Case, config, fit_args, last_checkpoint, run_cli

CASE = {case.name: case for case in CASES}

#: the readable images of ``predict_folder``: file -> (mode written, (height, width))
READABLE = {
    "rgb.png": ("RGB", (40, 56)),
    "gray.jpg": ("L", (33, 47)),
    "deep.png": ("I;16", (64, 32)),
    "palette.png": ("P", (30, 30)),
    "alpha.png": ("RGBA", (50, 41)),
    "gray_alpha.png": ("LA", (36, 36)),
    "print.jpg": ("CMYK", (45, 38)),
    "print.tif": ("CMYK", (28, 52)),
    "line2/rgb.png": ("RGB", (48, 48)),  # the same stem as rgb.png, in a subfolder
}
UNREADABLE = ("broken.png", "cut.png")  # random bytes; a PNG cut in half
OTHER_FILES = ("notes.txt", "line2/readme.md")


def write_mode(path: Path, mode: str, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # smooth content (JPEG keeps it), brighter to the right: a check that survives every mode; odd seeds brighter
    dark = 20 + 30 * (seed % 2)
    ramp = np.linspace(dark, dark + 150, size[1])[None, :, None] + rng.normal(0, 8, (*size, 3))
    rgb = Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8))
    if mode == "I;16":
        Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(path)
    else:
        rgb.convert(mode).save(path)


@pytest.fixture
def predict_folder(tmp_path) -> Path:
    """A folder of new images of mixed sizes and modes, a text file, and two corrupt images."""
    folder = tmp_path / "new_images"
    for seed, (name, (mode, size)) in enumerate(READABLE.items()):
        write_mode(folder / name, mode, size, seed)
    (folder / "broken.png").write_bytes(np.random.default_rng(0).bytes(200))
    whole = (folder / "rgb.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    for name in OTHER_FILES:
        (folder / name).write_text("not an image\n")
    return folder


# ------------------------------------------------------------------------------------------------ listing


def test_a_folder_is_listed_recursively_with_unique_overlay_names_and_other_files_counted(predict_folder):
    listing = list_predict_files(str(predict_folder))
    expected = sorted(str(predict_folder / name) for name in (*READABLE, *UNREADABLE))
    assert list(listing.images) == expected
    assert listing.skipped == {".txt": 1, ".md": 1}
    assert "skipped 2 file(s) that are not images (.md: 1, .txt: 1" in listing.describe()
    names = listing.names
    assert len(set(names.values())) == len(names)
    assert names[str(predict_folder / "gray.jpg")] == "gray"
    assert names[str(predict_folder / "rgb.png")] == "rgb__png"
    assert names[str(predict_folder / "line2" / "rgb.png")] == "line2__rgb__png"


def test_a_file_and_a_glob_are_listed(predict_folder):
    single = list_predict_files(str(predict_folder / "gray.jpg"))
    assert single.images == (str(predict_folder / "gray.jpg"),) and single.names == {single.images[0]: "gray"}
    pngs = list_predict_files(str(predict_folder / "**" / "*.png"))
    assert sorted(Path(p).name for p in pngs.images) == sorted(
        Path(n).name for n in (*READABLE, *UNREADABLE) if n.endswith(".png"))


@pytest.mark.parametrize("where, message", [
    ("empty", "is a folder with no image file in it or its subfolders"),
    ("missing", "does not exist; expected a folder of images"),
    ("only_text", "is a folder with no image file in it or its subfolders (it has 2 other file(s))"),
    ("text_file", "is not an image file"),
    ("glob", "matches no image file"),
])
def test_a_path_without_images_is_an_error_naming_it(where, message, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    for name in ("a.txt", "b.csv"):
        (tmp_path / "only_text" / name).write_text("x")
    path = {"empty": tmp_path / "empty", "missing": tmp_path / "nowhere", "only_text": tmp_path / "only_text",
            "text_file": tmp_path / "only_text" / "a.txt", "glob": tmp_path / "only_text" / "*.png"}[where]
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        list_predict_files(str(path))
    assert f"{PREDICT_PATH_KEY} {str(path)!r} {message}" in str(error.value)


# ------------------------------------------------------------------------------------------------ reading


def test_every_mode_is_read_as_rgb_at_the_evaluation_size_and_corrupt_files_are_named_and_skipped(predict_folder):
    listing = list_predict_files(str(predict_folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(PredictImages(listing.images, 32))
    by_name = {Path(item["path"]).relative_to(predict_folder).as_posix(): item for item in items}
    assert sorted(by_name) == sorted(READABLE)
    for name, (mode, size) in READABLE.items():
        image = by_name[name]["image"]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32, name
        assert by_name[name]["original_size"].tolist() == list(size), name
        # left dark, right bright in every mode (a 16-bit file is scaled, not clipped)
        left, right = float(image[:, :, :8].mean()), float(image[:, :, -8:].mean())
        assert 0.05 < left < right - 0.3, (name, mode, left, right)
    messages = [str(w.message) for w in caught]
    for name in UNREADABLE:
        assert any(f"predict: skipped cannot read image {str(predict_folder / name)!r}" in m for m in messages), messages


def test_processes_and_workers_share_the_images_with_none_repeated_or_left_out(predict_folder):
    listing = list_predict_files(str(predict_folder))
    seen = []
    for rank in range(2):
        dataset = PredictImages(listing.images, 16, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seen += [path for batch in loader for path in batch["path"]]
    assert sorted(seen) == sorted(str(predict_folder / name) for name in READABLE)


# ------------------------------------------------------------------------------------------------ writer


class BrightnessDetector(LightningModule):
    """A stand-in for a method: the anomaly map is the image's brightness, the score its mean, and the
    thresholds are fitted on brightness 0..0.5 (so a bright image or area is anomalous)."""

    def __init__(self, maps: bool = True, pixel_threshold: bool = True) -> None:
        super().__init__()
        self.maps = maps
        self.calibration = ScoreCalibration()
        normal = torch.linspace(0.0, 0.5, 20)
        pixels = maps and pixel_threshold
        self.calibration.fit(ThresholdSpec(quantile=0.9), normal, torch.zeros(20, dtype=torch.long),
                             normal.repeat(10) if pixels else None, torch.zeros(200, dtype=torch.long) if pixels else None)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        brightness = batch["image"].mean(1)
        return prediction(batch, brightness.flatten(1).mean(1), brightness if self.maps else None, self.calibration)


def one_class_data(surfaces_root: Path, predict_path: Path | None, **kwargs) -> OneClassDataModule:
    return OneClassDataModule(source=Domain(dataset="surfaces", root=str(surfaces_root), category="brick"),
                              image_size=32, batch_size=3, predict_path=None if predict_path is None
                              else str(predict_path), **kwargs)


def predict_with(module: LightningModule, data, run_dir: Path, **writer) -> list[dict]:
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[PredictionWriter(**writer)], default_root_dir=str(run_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        returned = trainer.predict(module, datamodule=data)
    assert returned is None, "the writer keeps no batch in memory"
    with (run_dir / "predictions.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("maps", [True, False], ids=["detector", "classifier"])
def test_the_writer_gives_one_csv_row_and_one_overlay_per_readable_image(maps, predict_folder, surfaces_root,
                                                                         tmp_path):
    run_dir = tmp_path / "run"
    rows = predict_with(BrightnessDetector(maps), one_class_data(surfaces_root, predict_folder), run_dir)
    assert tuple(rows[0]) == COLUMNS
    assert [row["path"] for row in rows] == sorted(str(predict_folder / name) for name in READABLE)
    assert not list(run_dir.glob("predictions.rank*.csv"))
    summary = BrightnessDetector(maps).calibration.summary()
    for row in rows:
        name = Path(row["path"]).relative_to(predict_folder).as_posix()
        assert (int(row["height"]), int(row["width"])) == READABLE[name][1]
        assert float(row["image_threshold"]) == pytest.approx(summary["image_threshold"], rel=1e-5)
        assert row["calibrated_on"] == "source" and row["calibration_method"] == "quantile"
        assert row["decision"] == ("anomalous" if float(row["score"]) > summary["image_threshold"] else "normal")
        assert 0.0 <= float(row["normalised_score"]) <= 1.0
        assert (row["pixel_threshold"] != "") == maps
        overlay = Image.open(run_dir / row["overlay"])
        assert overlay.mode == "RGB" and overlay.height > 256
        # the map panel beside the image for a detector; white (the header's width) for a classifier
        beside = np.asarray(overlay)[-20:, 300:500]
        assert (beside != 255).any() == maps, overlay.size
    assert {row["decision"] for row in rows} == {"anomalous", "normal"}
    assert len(list((run_dir / "overlays").glob("*.png"))) == len(READABLE)


def test_overlays_show_the_predicted_mask_contour_on_one_colour_scale(surfaces_root, tmp_path):
    folder = tmp_path / "two"
    for name, value in (("dim", 60), ("spot", 60)):
        pixels = np.full((64, 64, 3), value, np.uint8)
        if name == "spot":
            pixels[8:56, 8:56] = 250
        folder.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    run_dir = tmp_path / "run"
    rows = {Path(row["path"]).stem: row for row in
            predict_with(BrightnessDetector(), one_class_data(surfaces_root, folder), run_dir, colormap="gray",
                         alpha=1.0)}
    assert rows["spot"]["decision"] == "anomalous" and rows["dim"]["decision"] == "normal"
    dim, spot = (np.asarray(Image.open(run_dir / rows[n]["overlay"])).astype(int) for n in ("dim", "spot"))
    assert dim.shape == spot.shape
    # The second panel is the map alone (alpha 1, gray colormap): the same dim value has the same colour in
    # both overlays (one scale), and the spot is white with a contour only around it.
    top = dim.shape[0] - 256
    dim_map, spot_map = dim[top:, 256:512], spot[top:, 256:512]
    assert np.array_equal(dim_map[236:254, 236:254], spot_map[236:254, 236:254])
    assert spot_map[128, 128].min() > 240 and dim_map[128, 128].max() < 128
    contour = (spot[top:, :256] != dim[top:, :256]).any(axis=2) & (spot[top:, :256] == 255).all(axis=2)
    rows_with_contour = np.flatnonzero(contour.any(axis=1))
    assert 25 < rows_with_contour.min() < 40 and 215 < rows_with_contour.max() < 230, rows_with_contour


def test_maps_without_a_pixel_threshold_are_drawn_on_each_image_s_range(surfaces_root, tmp_path):
    folder = tmp_path / "one"
    write_mode(folder / "a.png", "RGB", (40, 40), 0)
    run_dir = tmp_path / "run"
    (row,) = predict_with(BrightnessDetector(pixel_threshold=False), one_class_data(surfaces_root, folder), run_dir)
    assert row["pixel_threshold"] == "" and row["image_threshold"] != ""
    overlay = np.asarray(Image.open(run_dir / row["overlay"]))
    assert (overlay[-20:, 300:500] != 255).any()  # the map panel is there, with no contour to draw


def test_predict_without_predict_path_names_the_key(surfaces_root, tmp_path):
    data = one_class_data(surfaces_root, None)
    with pytest.raises(ValueError, match=f"predict needs images: set {PREDICT_PATH_KEY}"):
        Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path),
                callbacks=[PredictionWriter()]).predict(BrightnessDetector(), datamodule=data)


def test_a_folder_of_corrupt_images_only_is_an_error_after_naming_them(surfaces_root, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="none of the 1 image file"):
        predict_with(BrightnessDetector(), one_class_data(surfaces_root, folder), tmp_path / "run")


# ------------------------------------------------------------------------------------------------ every method


def fit_case(name: str, root: Path, runs: Path, context: dict) -> tuple[Case, list[str], Path]:
    """A tiny fit of one case of ``tests/methods.py``: (case, its arguments, its last checkpoint)."""
    case = CASE[name]
    args = fit_args(case, root, runs, context)  # its max_steps does nothing in the later predict and test
    main(["fit", *args])
    return case, args, last_checkpoint(runs, case)


def predicted_rows(args: list[str], predict_path: Path, runs: Path) -> tuple[list[dict], Path, list[str]]:
    """``cli.py predict`` in this process: (CSV rows, run folder, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["predict", *args, "--data.init_args.predict_path", str(predict_path)])
    run_dir = Path(cli.trainer.default_root_dir)
    assert run_dir.is_relative_to(runs)
    with (run_dir / "predictions.csv").open(newline="") as handle:
        return list(csv.DictReader(handle)), run_dir, [str(w.message) for w in caught]


def check_predictions(rows: list[dict], run_dir: Path, messages: list[str], folder: Path, maps: bool,
                      calibrated_on: str) -> None:
    assert [row["path"] for row in rows] == sorted(str(folder / name) for name in READABLE)
    for row in rows:
        assert float(row["score"]) == pytest.approx(float(row["score"]))  # a number
        assert 0.0 <= float(row["normalised_score"]) <= 1.0
        assert row["decision"] == ("anomalous" if float(row["score"]) > float(row["image_threshold"]) else "normal")
        assert row["calibrated_on"] == calibrated_on and row["calibration_method"] == "quantile"
        assert (row["pixel_threshold"] != "") == maps
        assert (run_dir / row["overlay"]).is_file()
    assert len(list((run_dir / "overlays").glob("*.png"))) == len(READABLE)
    unreadable = ", ".join(repr(str(folder / name)) for name in UNREADABLE)
    assert any(f"2 image file(s) could not be read and have no row: {unreadable}" in m for m in messages), messages


#: case name -> (has anomaly maps, domain the thresholds are calibrated on)
PREDICTED = {"padim": (True, "source"), "csflow_adapt": (True, "source"), "densehybrid": (True, "source"),
             "meta_comparer": (True, "target"), "dann": (False, "source"), "adda": (False, "source")}


@pytest.mark.parametrize("name", PREDICTED)
def test_every_method_predicts_a_folder_from_its_checkpoint(name, surfaces_root, context, predict_folder, tmp_path):
    case, args, checkpoint = fit_case(name, surfaces_root, tmp_path, context)
    rows, run_dir, messages = predicted_rows([*args, "--ckpt_path", str(checkpoint)], predict_folder, tmp_path)
    check_predictions(rows, run_dir, messages, predict_folder, *PREDICTED[name])


def test_csflow_phase_one_predicts_a_folder(surfaces_root, context, predict_folder):
    checkpoint = context["csflow_source"]  # the session's phase-1 fit (tests/conftest.py)
    runs = checkpoint.parents[4]
    args = fit_args(CASE["csflow"], surfaces_root, runs, {})
    rows, run_dir, messages = predicted_rows([*args, "--ckpt_path", str(checkpoint)], predict_folder, runs)
    check_predictions(rows, run_dir, messages, predict_folder, True, "source")


def test_the_knn_baseline_predicts_a_folder_with_thresholds_from_its_references(surfaces_root, predict_folder,
                                                                                tmp_path):
    args = [*config("meta_comparer/surfaces_knn.yaml"), *QUIET, "--data.init_args.source.root", str(surfaces_root),
            "--data.init_args.domains", "[brick, grass, wood]", "--data.init_args.image_size", "32",
            "--run.root", str(tmp_path)]
    rows, run_dir, messages = predicted_rows(args, predict_folder, tmp_path)
    check_predictions(rows, run_dir, messages, predict_folder, True, "target")


def test_two_processes_score_each_image_once_into_one_csv(surfaces_root, predict_folder, tmp_path):
    case, args, checkpoint = fit_case("padim", surfaces_root, tmp_path / "fit", {})
    runs = tmp_path / "ddp"
    result = run_cli(["predict", *args, "--ckpt_path", str(checkpoint), "--run.root", str(runs),
                      "--trainer.strategy", case.ddp_strategy, "--trainer.devices", "2",
                      "--data.init_args.predict_path", str(predict_folder)])
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = (path.parent for path in runs.glob("padim/*/version_*/predictions.csv"))
    with (run_dir / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert not list(run_dir.glob("predictions.rank*.csv"))
    # the same scores as one process (features of a batch on another rank differ in the last bits at most)
    single, single_dir, _ = predicted_rows([*args, "--ckpt_path", str(checkpoint)], predict_folder, tmp_path / "fit")
    assert [row["path"] for row in rows] == [row["path"] for row in single]
    for two, one in zip(rows, single, strict=True):
        assert float(two["score"]) == pytest.approx(float(one["score"]), rel=1e-5), two["path"]
        assert two["decision"] == one["decision"]
    assert sorted(p.name for p in (run_dir / "overlays").glob("*.png")) == sorted(
        p.name for p in (single_dir / "overlays").glob("*.png"))


# ------------------------------------------------------------------------------------------------ bad input


def test_predict_without_a_path_or_with_an_empty_folder_is_a_clear_error(surfaces_root, tmp_path):
    case, args, checkpoint = fit_case("padim", surfaces_root, tmp_path, {})
    with pytest.raises(ValueError, match=f"predict needs images: set {PREDICT_PATH_KEY}"):
        main(["predict", *args, "--ckpt_path", str(checkpoint)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"{PREDICT_PATH_KEY} {str(empty)!r} is a folder with no image file"):
        main(["predict", *args, "--ckpt_path", str(checkpoint), "--data.init_args.predict_path", str(empty)])
