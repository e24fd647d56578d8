"""Test metrics per domain (``test/<domain>/<metric>``), and every method run from a source folder to a real
target folder through ``cli.py``."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_modules.base import AnomalyDetectionModule
from lightning_modules.components.domain_classifier_module import DomainClassifierModule
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
