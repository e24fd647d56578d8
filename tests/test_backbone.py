import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from skimage import data

from lightning_modules.components.backbone import (
    BackboneSpec,
    FeatureExtractor,
    WeightsNotFoundError,
    build_backbone,
    save_backbone_weights,
)
from lightning_modules.gmm_pretrain import GMMPretrain

CAT_CLASSES = set(range(281, 286))  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def chelsea_batch() -> torch.Tensor:
    image = torch.from_numpy(np.ascontiguousarray(data.chelsea())).permute(2, 0, 1).float() / 255
    return F.interpolate(image[None], size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


def test_packaged_weights_classify_chelsea_as_a_cat():
    model, normalizer, source = build_backbone(BackboneSpec())
    assert "packaged" in source and normalizer.mean_std() == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = normalizer(chelsea_batch())
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
    assert torch.equal(extractor.normalizer.mean.flatten(), torch.full((3,), 0.5))


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


def test_plain_state_dict_file_round_trips_with_timm_mean_std_and_says_so(tmp_path):
    model, _, _ = build_backbone(BackboneSpec())
    path = tmp_path / "lite0.pth"
    torch.save(model.state_dict(), path)
    with pytest.warns(UserWarning, match="without metadata"):
        loaded, normalizer, source = build_backbone(BackboneSpec(weights=str(path)))
    assert source.startswith("file") and "no metadata" in source
    assert normalizer.mean_std() == (model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_without_a_weight_source_the_error_lists_what_was_tried():
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone(BackboneSpec(name="resnet18"))
    message = str(err.value)
    assert "timm hub" in message and "local file" in message and "packaged" in message
    assert "backbone.weights=" in message


def test_gmm_pretrained_backbone_file_is_normalised_as_in_pre_training(tmp_path):
    # Pre-training starts from the packaged Lite0 and feeds it (x - 0.5) / 0.5; a backbone.pth written
    # before any step holds exactly the packaged weights, so only the normalisation can differ.
    pretrain = GMMPretrain(num_gaussians=2)
    pretrain.trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False)
    pretrain.on_fit_end()
    from_file = FeatureExtractor(BackboneSpec(weights=str(tmp_path / "backbone.pth")), layers=[1]).eval()
    packaged = FeatureExtractor(BackboneSpec(), layers=[1]).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(from_file(images), packaged(images))
    assert "GMM pre-training" in from_file.weights_source


def test_weights_metadata_must_match_the_architecture_and_be_well_formed(tmp_path):
    model, normalizer, _ = build_backbone(BackboneSpec())
    path = tmp_path / "lite0.pth"
    save_backbone_weights(path, model.state_dict(), "efficientnet_lite0", normalizer, "test")
    with pytest.raises(ValueError, match=r"architecture 'efficientnet_lite0'.*backbone.name is 'resnet18'"):
        build_backbone(BackboneSpec(name="resnet18", weights=str(path)))
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": model.state_dict(),
                "metadata": {"arch": "efficientnet_lite0", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.0, 0.5],
                             "source": "test"}}, bad)
    with pytest.raises(ValueError, match=r"bad.pth.*'std' must be 3 finite numbers > 0"):
        build_backbone(BackboneSpec(weights=str(bad)))


def test_unknown_backbone_names_get_close_suggestions_or_none():
    with pytest.raises(ValueError, match=r"unknown backbone name 'resnet1800'.*close timm names: resnet18\b"):
        build_backbone(BackboneSpec(name="resnet1800", weights="random"))
    with pytest.raises(ValueError, match=r"'qqqqzzzz'.*no timm name is close") as err:
        build_backbone(BackboneSpec(name="qqqqzzzz", weights="random"))
    assert "[]" not in str(err.value)


def test_bad_names_and_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone(BackboneSpec(weights=str(tmp_path / "nowhere.pth")))
    model, _, _ = build_backbone(BackboneSpec())
    whole = tmp_path / "whole.pth"
    torch.save(model.state_dict(), whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"^backbone.weights='.*truncated.pth' could not be read as a backbone state "
                                         r"dict.*truncated, corrupt"):
        build_backbone(BackboneSpec(weights=str(truncated)))
    with pytest.raises(ValueError, match="has no module"):
        FeatureExtractor(BackboneSpec(), layers=["layer9"])
