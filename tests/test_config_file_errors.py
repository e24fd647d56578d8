"""Files named in a config that are truncated or corrupt: the error names the config key and the file."""

from pathlib import Path

import pytest
import torch

from lightning_modules.csflow import CSFlowAdaptation
from lightning_modules.densehybrid.torch_model import DenseHybridModel


def truncated_torch_file(tmp_path: Path, name: str) -> Path:
    whole = tmp_path / f"whole_{name}"
    torch.save({"state_dict": {"weight": torch.zeros(4096)}}, whole)
    path = tmp_path / name
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def test_truncated_csflow_source_checkpoint_names_the_key_and_file(tmp_path):
    path = truncated_torch_file(tmp_path, "last.ckpt")
    with pytest.raises(ValueError, match=rf"^source_checkpoint='{path}' could not be read as the last.ckpt of a "
                                         r"phase-1 CS-Flow run .*truncated, corrupt or not a torch file"):
        CSFlowAdaptation(str(path))


def test_truncated_deeplab_weights_name_the_key_and_file(tmp_path):
    path = truncated_torch_file(tmp_path, "deeplab.pth")
    with pytest.raises(ValueError, match=rf"^deeplab_weights='{path}' could not be read as a torchvision "
                                         r"DeepLabV3-ResNet-50 state dict"):
        DenseHybridModel("deeplabv3_resnet50", deeplab_weights=str(path))
