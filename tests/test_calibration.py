"""Decision thresholds and score normalisation (issue 18 item 2): fitting, checkpoints, target shots, errors."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from cli import main
from lightning_modules.components.calibration import (
    ScoreCalibration,
    ThresholdSpec,
    f1_threshold,
    quantile,
)
from lightning_modules.meta_comparer import KNNPatchBaseline
from lightning_modules.padim import Padim
from tests.methods import padim_args
from tests.test_cli_runs import dann

FIT = ["--data.init_args.val_fraction", "0.34"]  # 4 of the 12 tiny train normals held out


class Unreadable(torch.Tensor):
    """A label that fails the test when anything reads it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"a target label was read ({func})")


def unreadable_label() -> torch.Tensor:
    return torch.Tensor._make_subclass(Unreadable, torch.tensor(0))


def random_images(count: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_quantile_matches_numpy():
    scores = torch.randn(1001, generator=torch.Generator().manual_seed(0)) * 7 + 3
    for q in (0.5, 0.9, 0.99, 0.999):
        assert quantile(scores, q) == pytest.approx(float(np.quantile(scores.double().numpy(), q)), rel=1e-12)


def test_f1_threshold_is_the_best_cut_for_score_above_threshold():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.35, 0.4, 0.8, 0.9, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1])

    def f1(threshold: float) -> float:
        called = scores > threshold
        tp = int((called & (labels == 1)).sum())
        return 2 * tp / (int(called.sum()) + int(labels.sum()))

    threshold = f1_threshold(scores, labels)
    assert f1(threshold) == max(f1(float(t) - 1e-9) for t in scores)
    assert not (scores == threshold).any()  # between two scores: no tie decides


def test_normalisation_is_monotone_in_unit_interval_with_the_threshold_at_half():
    normal = torch.randn(200, generator=torch.Generator().manual_seed(1)) + 10
    calibration = ScoreCalibration()
    calibration.fit(ThresholdSpec(quantile=0.95), normal, torch.zeros(200), normal.repeat(3), torch.zeros(600))
    threshold = float(calibration.image_threshold)
    assert threshold == pytest.approx(float(np.quantile(normal.double().numpy(), 0.95)), rel=1e-6)
    grid = torch.linspace(-50, 80, 5001)
    for normalise in (calibration.normalise_image, calibration.normalise_pixel):
        values = normalise(grid)
        assert values.min() >= 0 and values.max() <= 1
        assert (values[1:] >= values[:-1]).all()
        assert values[0] == 0 and values[-1] == 1
    assert float(calibration.normalise_image(torch.tensor([threshold]))) == pytest.approx(0.5, abs=1e-6)
    assert float(calibration.normalise_pixel(calibration.pixel_threshold[None])) == pytest.approx(0.5, abs=1e-6)
    # The decision score > threshold is the normalised score > 0.5.
    assert torch.equal(calibration.normalise_image(normal) > 0.5, normal > threshold)
    # The lowest normal score is 0.
    assert float(calibration.normalise_image(normal.min()[None])) == pytest.approx(0.0, abs=1e-6)


def test_f1_adaptive_without_labelled_defects_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"model.init_args.threshold.method f1_adaptive needs labelled defects"):
        ScoreCalibration().fit(ThresholdSpec(method="f1_adaptive"), torch.rand(10), torch.zeros(10))
    calibration = ScoreCalibration()
    calibration.fit(ThresholdSpec(method="f1_adaptive"), torch.tensor([0.1, 0.2, 0.7, 0.9]), torch.tensor([0, 0, 1, 1]))
    assert 0.2 < float(calibration.image_threshold) < 0.7 and calibration.method == "f1_adaptive"


def test_bad_threshold_specs_are_refused_by_key():
    with pytest.raises(ValueError, match="threshold.quantile must be in"):
        ThresholdSpec(quantile=1.0)
    with pytest.raises(ValueError, match="threshold.image_threshold"):
        ThresholdSpec(method="manual")
    with pytest.raises(ValueError, match="threshold.method must be one of"):
        ThresholdSpec(method="otsu")


def fitted_padim(threshold: ThresholdSpec | None = None) -> Padim:
    """A PaDiM fitted on random images, its thresholds on other random images (no Trainer)."""
    detector = Padim(num_features=8, blur_sigma=1.0, threshold=threshold)
    detector.model.accumulate(detector.model.embed(random_images(8, seed=0)))
    detector.eval()
    held_out = random_images(6, seed=1)
    with torch.no_grad():
        scores, maps = detector.anomaly_scores(held_out)
    batch = {"label": torch.zeros(6, dtype=torch.long), "path": [f"val/{i}.png" for i in range(6)],
             "mask": torch.zeros(6, 1, 32, 32), "has_mask": torch.zeros(6, dtype=torch.bool)}
    detector.record_held_out(batch, scores, maps)
    detector.held_out.fit(detector.calibration, detector.threshold, "source", "the test's held-out images")
    return detector


class Shots(Dataset):
    """Target normal shots whose labels raise when read."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": unreadable_label(), "path": f"shot/{index}.png"}


class ShotsData:
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def target_train_dataloader(self):
        return torch.utils.data.DataLoader(Shots(self.images), batch_size=2)


def test_target_shots_move_the_thresholds_by_the_shots_location_without_reading_a_label():
    detector = fitted_padim(ThresholdSpec(calibrate_on="target_shots"))
    source = detector.calibration.summary()
    shots = (random_images(1, seed=5) * 0.5 + 0.5)  # k = 1, a brighter line
    detector.ready_thresholds(ShotsData(shots), "predict")
    target = detector.calibration.summary()
    with torch.no_grad():
        shot_scores, shot_maps = detector.anomaly_scores(shots)
    offset = float(shot_scores.double().median()) - source["image_center"]
    assert offset > 0  # the brighter line scores higher
    assert target["domain"] == "target" and target["samples"] == 1
    assert target["image_threshold"] == pytest.approx(source["image_threshold"] + offset, rel=1e-5)
    pixel_offset = float(shot_maps.double().median()) - source["pixel_center"]
    assert target["pixel_threshold"] == pytest.approx(source["pixel_threshold"] + pixel_offset, rel=1e-5)
    # The normalisation moved with it: the target threshold maps to 0.5.
    assert float(detector.calibration.normalise_image(torch.tensor([target["image_threshold"]]))) == \
        pytest.approx(0.5, abs=1e-5)


def test_target_shots_without_shots_is_an_error_naming_the_keys():
    detector = fitted_padim(ThresholdSpec(calibrate_on="target_shots"))
    with pytest.raises(ValueError, match="threshold.calibrate_on target_shots needs target normal shots.*"
                                         "data.init_args.target_shots"):
        detector.ready_thresholds(References(random_images(2, seed=3)), "test")


def test_predict_step_gives_scores_maps_and_decisions_from_the_calibration():
    detector = fitted_padim()
    images = torch.cat([random_images(2, seed=1), torch.full((2, 3, 32, 32), 0.5)])
    with torch.no_grad():
        out = detector.predict_step({"image": images, "path": ["a", "b", "c", "d"],
                                     "original_size": torch.tensor([[40, 48]] * 4)}, 0)
    assert out["path"] == ["a", "b", "c", "d"] and out["image"].shape == (4, 3, 32, 32)
    assert out["score"].shape == (4,) and out["anomaly_map"].shape == (4, 32, 32)
    assert torch.equal(out["decision"], out["score"] > detector.calibration.image_threshold)
    assert torch.equal(out["decision"], out["normalised_score"] > 0.5)
    assert ((out["normalised_map"] >= 0) & (out["normalised_map"] <= 1)).all()
    assert torch.equal(out["predicted_mask"], out["normalised_map"] > 0.5)
    assert out["calibration"]["domain"] == "source" and out["calibration"]["method"] == "quantile"
    assert out["decision"][2:].all()  # flat gray images are far from the random-image Gaussians


class References:
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def reference_images(self) -> torch.Tensor:
        return self.images


def test_reference_detectors_fit_their_thresholds_on_the_target_references():
    detector = KNNPatchBaseline(layers=[2])
    detector.eval()
    references = random_images(4, seed=2, size=64)
    detector.prepare_scoring(References(references))
    summary = detector.calibration.summary()
    assert summary["domain"] == "target" and summary["samples"] == 4
    # Each half is scored against the other, so a reference scores below its held-out threshold once it is in
    # the final bank (distance 0 to itself).
    scores, _ = detector.anomaly_scores(references)
    assert (scores < summary["image_threshold"]).all()
    with pytest.warns(UserWarning, match="no thresholds: fitting them on the references needs at least 2 reference images"):
        detector.prepare_scoring(References(references[:1]))
    assert not detector.calibration.is_fitted


def test_an_old_checkpoint_without_calibration_keys_loads_unfitted():
    detector = fitted_padim()
    state = {k: v for k, v in detector.state_dict().items() if not k.startswith("calibration.")}
    restored = Padim(num_features=8, blur_sigma=1.0)
    restored.load_state_dict(state)  # strict: no missing key
    assert not restored.calibration.is_fitted and restored.calibration.method == "unfitted"
    again = Padim(num_features=8, blur_sigma=1.0)
    again.load_state_dict(detector.state_dict())
    assert again.calibration.summary() == detector.calibration.summary()


def stored_calibration(checkpoint: Path) -> dict:
    """The calibration summary a checkpoint file holds."""
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    calibration = ScoreCalibration()
    calibration.load_state_dict({k.removeprefix("calibration."): v for k, v in state.items()
                                 if k.startswith("calibration.")})
    return calibration.summary()


@pytest.fixture(scope="module")
def fitted_run(surfaces_root, tmp_path_factory) -> tuple[Path, Path, object]:
    runs = tmp_path_factory.mktemp("calibration_runs")
    cli = main(["fit", *padim_args(surfaces_root, runs, {}), *FIT])
    return runs, next(runs.glob("padim/*/version_0/checkpoints/last.ckpt")), cli


def test_a_fitted_checkpoint_holds_the_validation_thresholds_and_reloads_them(fitted_run, surfaces_root):
    runs, checkpoint, cli = fitted_run
    summary = stored_calibration(checkpoint)
    stored = {name: summary.pop(name) for name in ScoreCalibration.BUFFERS}
    assert summary == {"method": "quantile", "quantile": 0.99, "domain": "source", "samples": 4}
    # The held-out source normals, scored independently: the stored thresholds are their 0.99 quantiles
    # (the 64 px maps have 4096 pixels, all kept).
    model, datamodule = cli.model.eval(), cli.datamodule
    with torch.no_grad():
        scored = [model.anomaly_scores(batch["image"]) for batch in datamodule.val_dataloader()]
    scores = torch.cat([s for s, _ in scored]).double().numpy()
    pixels = torch.cat([m for _, m in scored]).double().numpy()
    assert len(scores) == 4
    assert stored["image_threshold"] == pytest.approx(np.quantile(scores, 0.99), rel=1e-5)
    assert stored["pixel_threshold"] == pytest.approx(np.quantile(pixels, 0.99), rel=1e-5)
    # Logged before the checkpoint was written: the same value in metrics.csv.
    metrics = (checkpoint.parent.parent / "metrics.csv").read_text()
    assert "val/image_threshold" in metrics.splitlines()[0]
    # A test of the checkpoint uses exactly these values and writes them into results.json.
    tested = main(["test", *padim_args(surfaces_root, runs, {}), *FIT, "--ckpt_path", str(checkpoint)])
    assert tested.model.calibration.summary() == {**stored, "method": "quantile", "quantile": 0.99,
                                                   "domain": "source", "samples": 4}
    results = json.loads((Path(tested.trainer.default_root_dir) / "results.json").read_text())
    assert results["calibration"]["image_threshold"] == pytest.approx(stored["image_threshold"], rel=1e-6)
    assert results["calibration"]["domain"] == "source"


def test_threshold_options_change_at_predict_time(fitted_run, surfaces_root):
    runs, checkpoint, _ = fitted_run
    predict = ["predict", *padim_args(surfaces_root, runs, {}), *FIT, "--ckpt_path", str(checkpoint),
               "--data.init_args.predict_path", str(surfaces_root / "brick" / "test")]
    cli = main([*predict, "--model.init_args.threshold.method", "manual",
                "--model.init_args.threshold.image_threshold", "7.5"])
    summary = cli.model.calibration.summary()
    assert summary["image_threshold"] == 7.5 and summary["domain"] == "manual"
    with pytest.warns(UserWarning, match="fitted quantile thresholds on the DataModule's validation split"):
        cli = main([*predict, "--model.init_args.threshold.quantile", "0.5"])
    assert cli.model.calibration.quantile == 0.5


def test_an_old_checkpoint_gets_thresholds_from_the_validation_split_or_a_clear_error(fitted_run, surfaces_root,
                                                                                     tmp_path):
    runs, checkpoint, _ = fitted_run
    old = torch.load(checkpoint, weights_only=True, map_location="cpu")
    old["state_dict"] = {k: v for k, v in old["state_dict"].items() if not k.startswith("calibration.")}
    old["hyper_parameters"].pop("threshold")
    old_path = tmp_path / "old.ckpt"
    torch.save(old, old_path)
    predict = ["predict", *padim_args(surfaces_root, runs, {}), "--ckpt_path", str(old_path),
               "--data.init_args.predict_path", str(surfaces_root / "brick" / "test")]
    with pytest.warns(UserWarning, match="the checkpoint has no thresholds; fitted quantile thresholds"):
        cli = main([*predict, *FIT])
    assert cli.model.calibration.is_fitted and cli.model.calibration.samples == 4
    no_validation = [*predict, "--data.init_args.val_fraction", "0.0"]
    with warnings.catch_warnings(), pytest.raises(ValueError, match="threshold.method manual"):
        warnings.simplefilter("ignore")
        main(no_validation)
    # What the message says to pass works on that checkpoint.
    cli = main([*no_validation, "--model.init_args.threshold.method", "manual",
                "--model.init_args.threshold.image_threshold", "9.5"])
    assert cli.model.calibration.summary()["image_threshold"] == 9.5


def test_the_classifier_fits_its_threshold_on_the_source_val_split(surfaces_root, tmp_path):
    fit = ["fit", *dann(surfaces_root, "source_only"), "--trainer.max_steps", "3", "--run.root", str(tmp_path)]
    cli = main(fit)  # one epoch, then its validation
    summary = stored_calibration(next(tmp_path.glob("source_only/*/version_0/checkpoints/last.ckpt")))
    assert summary["method"] == "quantile" and summary["domain"] == "source"
    model = cli.model.eval()
    with torch.no_grad():
        scored = [(torch.sigmoid(model.model(batch["image"], "source")), batch["label"])
                  for batch in cli.datamodule.val_dataloader()]
    probabilities = torch.cat([p for p, _ in scored])[torch.cat([label for _, label in scored]) == 0]
    threshold = summary["image_threshold"]
    assert threshold == pytest.approx(float(np.quantile(probabilities.double().numpy(), 0.99)), rel=1e-5)
    with torch.no_grad():
        out = model.predict_step({"image": random_images(3, seed=4), "path": ["a", "b", "c"]}, 0)
    assert out["anomaly_map"] is None and out["normalised_map"] is None and out["predicted_mask"] is None
    assert ((out["score"] >= 0) & (out["score"] <= 1)).all()
    assert torch.equal(out["decision"], out["score"] > threshold)
    # The tiny source val split holds normals only: f1_adaptive stops, naming the key.
    with pytest.raises(ValueError, match="model.init_args.threshold.method f1_adaptive needs labelled defects in "
                                         "the source val split"):
        main([*fit, "--model.init_args.threshold.method", "f1_adaptive"])
