import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from lightning_modules.components.backbone import (
    BackboneSpec,
    FeatureExtractor,
    WeightsNotFoundError,
    build_backbone,
)

CAT_CLASSES = set(range(281, 286))  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def chelsea_batch() -> torch.Tensor:
    image = torch.from_numpy(np.ascontiguousarray(data.chelsea())).permute(2, 0, 1).float() / 255
    return F.interpolate(image[None], size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


def test_packaged_weights_classify_chelsea_as_a_cat():
    model, (mean, std), source = build_backbone(BackboneSpec())
    assert "packaged" in source and mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
    x = (chelsea_batch() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        top3 = model.eval()(x).topk(3).indices[0].tolist()
    assert CAT_CLASSES & set(top3), f"top-3 ImageNet classes {top3} hold no cat: the weight remap is wrong"


def test_random_weights_do_not_see_a_cat():
    torch.manual_seed(0)
    model, _, _ = build_backbone(BackboneSpec(weights="random"))
    with torch.no_grad():
        top3 = model.eval()(chelsea_batch()).topk(3).indices[0].tolist()
    assert not CAT_CLASSES & set(top3)


def test_extractor_returns_chosen_layers_and_normalises_inside():
    extractor = FeatureExtractor(BackboneSpec(), layers=[1, "blocks.5.2"])
    features = extractor(torch.rand(2, 3, 64, 64))
    assert list(features) == ["blocks.1", "blocks.5.2"]
    assert features["blocks.1"].shape == (2, 24, 16, 16)
    assert features["blocks.5.2"].shape == (2, 192, 2, 2)
    assert extractor.out_channels == [24, 192]
    assert torch.equal(extractor.mean.flatten(), torch.full((3,), 0.5))


def test_frozen_parts_have_no_grad_and_stay_in_eval():
    extractor = FeatureExtractor(BackboneSpec(), layers=["blocks.4"], trainable=["blocks.1"])
    extractor.train()
    for name, param in extractor.body.named_parameters():
        assert param.requires_grad == name.startswith("blocks.1."), name
    for name, module in extractor.body.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.training == name.startswith("blocks.1."), name
    before = {k: v.clone() for k, v in extractor.body.state_dict().items() if not k.startswith("blocks.1.")}
    extractor(torch.rand(2, 3, 64, 64)).popitem()[1].mean().backward()
    after = extractor.body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen BatchNorm statistics moved"


def test_local_weights_file_round_trip(tmp_path):
    model, _, _ = build_backbone(BackboneSpec())
    path = tmp_path / "lite0.pth"
    torch.save(model.state_dict(), path)
    loaded, _, source = build_backbone(BackboneSpec(weights=str(path)))
    assert source.startswith("file")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_without_a_weight_source_the_error_lists_what_was_tried():
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone(BackboneSpec(name="resnet18"))
    message = str(err.value)
    assert "timm hub" in message and "local file" in message and "packaged" in message
    assert "backbone.weights=" in message


def test_bad_names_and_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone name 'resnet1800'"):
        build_backbone(BackboneSpec(name="resnet1800", weights="random"))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone(BackboneSpec(weights=str(tmp_path / "nowhere.pth")))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        build_backbone(BackboneSpec(weights=str(corrupt)))
    with pytest.raises(ValueError, match="has no module"):
        FeatureExtractor(BackboneSpec(), layers=["layer9"])
