"""``trainer.sync_batchnorm`` on timm backbones: the conversion must not change what the model computes."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from timm.layers import BatchNormAct2d

from cli import RUN_DIR_ENV, main
from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor
from lightning_modules.components.sync_batchnorm import TimmSyncBatchNorm
from tests.methods import CASES


def features(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(images)


def test_timm_conversion_keeps_the_fused_activations_where_torchs_drops_them():
    images = torch.rand(2, 3, 64, 64)
    reference = features(FeatureExtractor(BackboneSpec(name="efficientnet_lite0"), [2, 3]), images)
    torchs = features(TorchSyncBatchNorm().apply(FeatureExtractor(BackboneSpec(name="efficientnet_lite0"), [2, 3])),
                      images)
    assert (torchs["blocks.4"] - reference["blocks.4"]).abs().max() > 1.0  # the bug this plugin avoids
    plugin = TimmSyncBatchNorm()
    converted = plugin.apply(FeatureExtractor(BackboneSpec(name="efficientnet_lite0"), [2, 3]))
    assert all(not isinstance(m, BatchNormAct2d) or isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    for name, value in features(converted, images).items():
        torch.testing.assert_close(value, reference[name])
    reverted = plugin.revert(converted)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in reverted.modules())
    assert any(type(m) is BatchNormAct2d for m in reverted.modules())
    for name, value in features(reverted, images).items():
        torch.testing.assert_close(value, reference[name])


class RecordTrainer(Callback):
    """Keeps the trainer of the last run, so a test can look at it after an exception."""

    trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        RecordTrainer.trainer = trainer


def test_the_cli_converts_with_timm_when_sync_batchnorm_is_on(surfaces_root, tmp_path):
    case = next(c for c in CASES if c.name == "dann")
    args = [*case.args(surfaces_root, tmp_path, {}), case.batch_option, str(case.batch_size), "--trainer.max_steps", "2"]
    plain = main(["fit", *args]).model
    # On CPU, DDP refuses SyncBatchNorm once the model is converted; the conversion itself is what is checked.
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        main(["fit", *args, "--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.sync_batchnorm", "true",
              "--trainer.callbacks+=tests.test_sync_batchnorm.RecordTrainer", "--run.root", str(tmp_path / "synced")])
    assert RUN_DIR_ENV not in os.environ  # the next run in this process gets its own folder
    trainer = RecordTrainer.trainer
    assert isinstance(trainer.strategy._layer_sync, TimmSyncBatchNorm)
    # Lightning's teardown after the error reverted the conversion: the fused layers must be whole again.
    converted = trainer.lightning_module
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    assert any(type(m) is BatchNormAct2d for m in converted.modules())
    converted.load_state_dict(plain.state_dict())
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval().embed(images, "target"), plain.eval().embed(images, "target"))
