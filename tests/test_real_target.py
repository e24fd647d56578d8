"""Test metrics per domain (``test/<domain>/<metric>``), and every method run from a source folder to a real
target folder through ``cli.py``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from cli import main
from datamodules.surfaces import MARKER
from lightning_modules.base import AnomalyDetectionModule
from lightning_modules.components.domain_classifier_module import DomainClassifierModule
from tests.methods import CASES, QUIET, Case, config, dann_args, last_checkpoint, logged, results
from tests.toy import ToyDataModule, ToyImages

# ------------------------------------------------------------------ per-domain metrics, on a stub DataModule


class Relabelled(Dataset):
    """Toy images whose labels are inverted and whose masks are absent: a domain where the bright square is
    the normal look, so a brightness detector ranks it backwards (AUROC 0 where the target gives 1)."""

    def __init__(self, images: ToyImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {**self.images[index], "label": 1 - self.images[index]["label"], "has_mask": False,
                "path": f"relabelled/{index}.png"}


class TwoDomainToyData(ToyDataModule):
    """Test loaders ``[target, source]``: the toy set, and the relabelled toy set without masks."""

    test_dataloader_names = ("target", "source")

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(ToyImages(self.test_size, 0.5, seed=3), batch_size=self.batch_size),
                DataLoader(Relabelled(ToyImages(self.test_size, 0.5, seed=4)), batch_size=self.batch_size)]


class Brightness(AnomalyDetectionModule):
    """The channel mean is the anomaly map: the toy's bright squares score highest."""

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = images.mean(1)
        return maps.flatten(1).amax(1), maps


class BrightnessModel(torch.nn.Module):
    """A defect classifier that reads the square as a defect in the target and as normal in the source."""

    def forward(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        logits = 20 * (images.amax((1, 2, 3)) - 0.75)
        return logits if domain == "target" else -logits


class BrightnessClassifier(DomainClassifierModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = BrightnessModel()


def run_test(module, datamodule) -> dict[str, float]:
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.test(module, datamodule=datamodule)
    assert module.test_results == {k: pytest.approx(float(v)) for k, v in trainer.callback_metrics.items()}
    return module.test_results


def test_a_detector_reports_each_test_domain_under_its_name_and_skips_pixels_where_it_has_no_masks():
    module = Brightness()
    with pytest.warns(UserWarning, match="pixel metrics skipped on the source test set"):
        results = run_test(module, TwoDomainToyData())
    assert results["test/target/image_auroc"] == 1.0 and results["test/target/pixel_auroc"] == pytest.approx(1.0)
    assert results["test/source/image_auroc"] == 0.0  # scored apart: pooled with the target it would be ~0.5
    assert "test/target/pixel_aupro" in results and not any(k.startswith("test/source/pixel") for k in results)
    assert not any(k.count("/") != 2 for k in results), results
    # The figure shows target maps: the first test loader's first images.
    target = ToyImages(24, 0.5, seed=3)
    assert torch.equal(module.map_examples["image"], target.images[: module.num_map_examples])


def test_a_detector_without_dataloader_names_reports_the_target():
    results = run_test(Brightness(), ToyDataModule())
    assert results["test/target/image_auroc"] == 1.0 and "test/target/pixel_aupro" in results


def test_test_dataloader_names_must_name_each_test_loader():
    class Unnamed(TwoDomainToyData):
        test_dataloader_names = ("target",)

    with pytest.raises(ValueError, match=r"Unnamed.test_dataloader_names is \('target',\), but the test has 2"):
        run_test(Brightness(), Unnamed())


def test_the_domain_classifier_reports_each_test_domain_under_its_name():
    data = TwoDomainToyData()
    results = run_test(BrightnessClassifier(), data)
    # Accuracy 1 in both only if the source loader was scored as the source domain.
    assert results == {"test/target/accuracy": 1.0, "test/target/auroc": 1.0,
                       "test/source/accuracy": 1.0, "test/source/auroc": 1.0}


# ------------------------------------------------ every method: source folder -> real target folder (cli.py)

CASE = {case.name: case for case in CASES}
DETECTOR_METRICS = {"image_auroc", "pixel_auroc", "pixel_aupro"}
NO_SHIFT = ["--data.init_args.target.shift", "null"]  # configs of a synthetic shift set one on the target


@pytest.fixture(scope="module")
def user_folder(surfaces_line_b_root, tmp_path_factory) -> Path:
    """A user's second line: line B's images copied into a plain folder in MVTec AD layout (no build marker)."""
    folder = tmp_path_factory.mktemp("line_b_folder") / "lineB"
    shutil.copytree(surfaces_line_b_root, folder, ignore=shutil.ignore_patterns(MARKER))
    return folder


def embedded_line_b(root: Path) -> list[str]:
    return ["--data.init_args.target.dataset", "surfaces_line_b", "--data.init_args.target.root", str(root)]


def fit(case: Case, args: list[str], target: list[str], steps: int | None = None):
    """A tiny fit of ``case`` against the ``target`` arguments, tested at its end (``steps``: the case's)."""
    steps_args = [] if case.loss_key is None else ["--trainer.max_steps", str(steps or case.steps)]
    return main(["fit", *args, case.batch_option, str(case.batch_size), *steps_args, *target,
                 "--run.test_after_fit", "true"])


def from_folder(dataset, root: Path) -> bool:
    """Whether ``dataset`` holds images and all of them are in the folder ``root``."""
    return bool(dataset.samples) and all(Path(s.image_path).is_relative_to(root) for s in dataset.samples)


def assert_both_domains(cli, metrics: set[str]) -> dict[str, float]:
    found = results(Path(cli.trainer.default_root_dir))
    expected = {f"test/{domain}/{metric}" for domain in ("target", "source") for metric in metrics}
    assert expected <= found.keys(), sorted(found)
    return found


@pytest.mark.parametrize("mode", ["source_only", "dann", "adda", "adabn"])
def test_domain_classifiers_train_against_an_unlabelled_target_folder(mode, surfaces_root, user_folder, tmp_path):
    case = CASE.get(mode, CASE["dann"])  # adda's steps reach its adversarial phase on the target
    # The command: the target is a folder and a category, nothing else.
    target = ["--data.init_args.target.root", str(user_folder), "--data.init_args.target.category", "grass"]
    cli = fit(case, dann_args(mode)(surfaces_root, tmp_path, {}), target)
    data = cli.datamodule
    assert from_folder(data.target_train, user_folder) and from_folder(data.target_test, user_folder)
    assert from_folder(data.source_test, surfaces_root)
    assert next(iter(data.train_dataloader()["target"]))["label"].eq(-1).all()  # the target is unlabelled
    assert_both_domains(cli, {"accuracy"})  # (no AUROC: the tiny build's test splits hold normals only)
    # Model selection is label-free on the target: only the source val split is scored.
    folder = Path(cli.trainer.default_root_dir)
    assert logged(folder, "val/source_accuracy") and not logged(folder, "val/target_oracle_accuracy")


def test_csflow_fits_the_source_tests_both_and_adapts_on_shots_of_the_target_folder(surfaces_root,
                                                                                  surfaces_line_b_root, tmp_path):
    phase_1, phase_2 = CASE["csflow"], CASE["csflow_adapt"]
    target = [*embedded_line_b(surfaces_line_b_root), *NO_SHIFT]
    source = fit(phase_1, phase_1.args(surfaces_root, tmp_path, {}), target)
    assert from_folder(source.datamodule.train_dataset, surfaces_root)
    assert_both_domains(source, DETECTOR_METRICS)

    context = {"csflow_source": last_checkpoint(tmp_path, phase_1)}
    adapted = fit(phase_2, phase_2.args(surfaces_root, tmp_path, context), target)
    shots = adapted.datamodule.target_shots_dataset
    assert len(shots) == 2 and from_folder(shots, surfaces_line_b_root)
    assert adapted.datamodule.train_dataset is shots
    assert from_folder(adapted.datamodule.test_dataset, surfaces_line_b_root)
    assert_both_domains(adapted, DETECTOR_METRICS)


@pytest.mark.parametrize("name", ["padim", "densehybrid"])
def test_detectors_fit_the_source_and_test_both_domains(name, surfaces_root, surfaces_line_b_root, user_folder,
                                                        tmp_path):
    case = CASE[name]
    # PaDiM on the user's folder, DenseHybrid on the embedded line B
    folder, target = ((user_folder, ["--data.init_args.target.root", str(user_folder)]) if name == "padim"
                      else (surfaces_line_b_root, embedded_line_b(surfaces_line_b_root)))
    cli = fit(case, case.args(surfaces_root, tmp_path, {}), target)
    assert from_folder(cli.datamodule.train_dataset, surfaces_root)
    assert from_folder(cli.datamodule.test_dataset, folder)
    assert_both_domains(cli, DETECTOR_METRICS)


def test_meta_comparer_and_its_baselines_take_references_from_the_held_out_target_folder(
        surfaces_root, surfaces_line_b_root, tmp_path):
    case = CASE["meta_comparer"]
    args, target = case.args(surfaces_root, tmp_path, {}), embedded_line_b(surfaces_line_b_root)
    runs = [fit(case, args, target, steps=2),
            fit(case, [*args, *config("meta_comparer/surfaces_aggregate.yaml")], target, steps=2)]
    runs += [main(["test", *config(f"meta_comparer/surfaces_{baseline}.yaml"), *QUIET,
                   "--data.init_args.source.root", str(surfaces_root), "--data.init_args.domains",
                   "[brick, grass, wood]", "--data.init_args.image_size", "64", "--run.root", str(tmp_path), *target])
             for baseline in ("knn", "padim")]
    for cli in runs:
        data = cli.datamodule
        assert from_folder(data.reference_dataset(), surfaces_line_b_root)
        assert from_folder(data.test_dataset, surfaces_line_b_root)
        metrics = results(Path(cli.trainer.default_root_dir))
        assert {"test/target/image_auroc", "test/target/pixel_auroc"} <= metrics.keys(), metrics
