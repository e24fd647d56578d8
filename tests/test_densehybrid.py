import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cli import main
from lightning_modules.components.metrics import auroc
from lightning_modules.components.negative_pasting import (
    NegativeBankSpec,
    NegativePaster,
    _build_bank,
    negative_bank,
    paste_sides,
)
from lightning_modules.components.target_recalibration import RecalibrationSpec
from lightning_modules.densehybrid import DenseHybridAD, DenseHybridModel, densehybrid_loss
from tests.test_real_target import NO_SHIFT, embedded_line_b, logged

REPO = Path(__file__).resolve().parents[1]
SMALL_BANK = NegativeBankSpec(segmentation="slic", size=24, patch_size=16)
HEADS = {"logits_head.bn", "logits_head.conv", "outlier_head.bn", "outlier_head.conv"}


def trainable_modules(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.requires_grad}


def all_modules(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}


def cli_args(root: Path, tmp_path: Path, category: str = "brick", steps: int = 3, extra: tuple = ()) -> list[str]:
    return ["--config", "configs/trainer/default.yaml", "--config", "configs/densehybrid/surfaces.yaml",
            "--data.init_args.source.root", str(root), "--data.init_args.source.category", category,
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
            "--model.init_args.negatives.size", "24", "--model.init_args.negatives.segmentation", "slic",
            "--model.init_args.negatives.patch_size", "16", "--model.init_args.decoder_channels", "16",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--run.root", str(tmp_path / "runs"), "--run.wandb", "false", *extra]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("shape", ["mask", "rectangle", "mixed"])
def test_paste_keeps_the_rest_unchanged_and_labels_exactly_the_pasted_pixels(shape):
    paster = NegativePaster(negative_bank(SMALL_BANK), shape)
    # -1 is outside the [0, 1] range of any negative, so a changed pixel is a pasted one and vice versa.
    images = torch.full((16, 3, 48, 40), -1.0)
    out, pasted = paster(images, torch.Generator().manual_seed(0))
    assert pasted.shape == (16, 48, 40) and pasted.dtype == torch.bool
    assert torch.equal((out != -1).any(1), pasted)
    assert pasted.flatten(1).any(1).all(), "every image gets a paste at probability 1"
    assert out[pasted[:, None].expand_as(out)].min() >= 0
    rectangles = [pasted[i] for i in range(16)
                  if pasted[i].sum() == pasted[i].any(1).sum() * pasted[i].any(0).sum()]
    if shape == "rectangle":
        assert len(rectangles) == 16
        sides_h, sides_w = paste_sides(48).tolist(), paste_sides(40).tolist()
        assert all(r.any(1).sum() in sides_h and r.any(0).sum() in sides_w for r in rectangles)
    if shape == "mask":
        assert len(rectangles) < 8, "object shapes are not rectangles"


def test_paste_probability_and_sides():
    paster = NegativePaster(negative_bank(SMALL_BANK), "mask", probability=0.0)
    images = torch.rand(4, 3, 32, 32)
    out, pasted = paster(images)
    assert not pasted.any() and torch.equal(out, images)
    assert paste_sides(256).tolist()[:3] == [16, 24, 32] and paste_sides(256).max() == 128
    assert paste_sides(128).tolist()[:3] == [8, 12, 16], "sides scale down with smaller images"
    with pytest.raises(ValueError, match="paste shape"):
        NegativePaster(negative_bank(SMALL_BANK), "circle")


def test_negative_bank_is_deterministic_object_shaped_and_cached():
    bank = negative_bank(SMALL_BANK)
    assert bank.shape == (24, 4, 16, 16) and bank.dtype == torch.uint8
    assert negative_bank(SMALL_BANK) is bank, "built once per spec"
    rebuilt = _build_bank.__wrapped__(tuple(SMALL_BANK.__dict__.values()))
    assert torch.equal(rebuilt, bank)
    coverage = (bank[:, 3] > 0).flatten(1).float().mean(1)
    assert (coverage > 0).all() and (coverage < 1).any()


def test_ade20k_folder_is_a_negative_source(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        labels = np.zeros((60, 80), np.uint8)
        labels[10:30, 10:40], labels[30:50, 20:50], labels[5:25, 50:75] = 3, 7, 12
        image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        (tmp_path / "images" / "training").mkdir(parents=True, exist_ok=True)
        (tmp_path / "annotations" / "training").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "images" / "training" / f"ADE_{i}.jpg"), image)
        cv2.imwrite(str(tmp_path / "annotations" / "training" / f"ADE_{i}.png"), labels)
    bank = negative_bank(NegativeBankSpec(source=str(tmp_path), size=6, patch_size=16, max_area=0.5))
    assert bank.shape == (6, 4, 16, 16)
    with pytest.raises(FileNotFoundError, match="ADE20K layout"):
        negative_bank(NegativeBankSpec(source=str(tmp_path / "missing")))


def test_light_freeze_policies_leave_exactly_the_intended_parameters_trainable():
    model = DenseHybridModel("light", num_classes=3, freeze="all", decoder_channels=16)
    assert trainable_modules(model) == HEADS
    model.train()
    assert not model.encoder.training and not model.decoder.training and model.logits_head.bn.training
    assert not model.logits_head.training or model.logits_head.bn.training  # its BN trains
    backbone = DenseHybridModel("light", num_classes=3, freeze="backbone", decoder_channels=16)
    decoder = {name for name in all_modules(backbone) if name.startswith("decoder.")}
    assert decoder and trainable_modules(backbone) == HEADS | decoder
    backbone.train()
    assert not any(m.training for m in backbone.encoder.modules()) and backbone.decoder.training
    none = DenseHybridModel("light", num_classes=3, freeze="none", decoder_channels=16)
    assert trainable_modules(none) == all_modules(none)
    assert none.train().encoder.extractor.body.training


def test_deeplab_freeze_policies_and_missing_weights():
    model = DenseHybridModel("deeplabv3_resnet50", freeze="all", deeplab_weights="random")
    assert trainable_modules(model) == HEADS
    assert model.logits_head.conv.out_channels == 21 and model.decoder.out_channels == 256
    model.freeze = "backbone"
    model._apply_freeze()
    decoder = {name for name in all_modules(model) if name.startswith("decoder.")}
    assert decoder and trainable_modules(model) == HEADS | decoder
    model.train()
    assert not model.encoder.training
    with pytest.raises(FileNotFoundError, match="needs segmentation weights"):
        DenseHybridModel("deeplabv3_resnet50")
    with pytest.raises(FileNotFoundError, match="no such file"):
        DenseHybridModel("deeplabv3_resnet50", deeplab_weights="/nonexistent/deeplab.pth")


def test_loss_terms_follow_equation_one():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    outlier = torch.randn(2, 8, 8)
    pasted = torch.zeros(2, 8, 8, dtype=torch.bool)
    pasted[0, :4, :4] = True
    terms = densehybrid_loss(logits, outlier, pasted, beta=0.5, outlier_head_weight=2.0,
                             class_targets=torch.tensor([1, 2]))
    lse = torch.logsumexp(logits, 1)
    assert torch.allclose(terms["energy"], 0.5 * lse[pasted].mean())
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(outlier, pasted.float())
    assert torch.allclose(terms["outlier_head"], 2.0 * expected_bce)
    terms["energy"].backward()
    assert logits.grad[~pasted[:, None].expand_as(logits)].abs().max() == 0, "energy acts on pasted pixels only"
    assert set(densehybrid_loss(logits, outlier, pasted, 0.03, 0.3)) == {"outlier_head", "energy"}


def test_score_is_higher_on_pasted_regions_after_a_short_fit(surfaces_root):
    from datamodules import Domain, OneClassDataModule

    torch.manual_seed(0)
    data = OneClassDataModule(source=Domain(dataset="surfaces", root=str(surfaces_root), category="woven"),
                              image_size=64, batch_size=8)
    data.setup()
    model = DenseHybridAD(freeze="backbone", decoder_channels=32, negatives=SMALL_BANK)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(8):
        for batch in data.train_dataloader():
            loss = sum(model._loss_terms(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    images = torch.stack([data.test_dataset[i]["image"] for i in range(len(data.test_dataset))])
    with torch.no_grad():
        pasted_images, pasted = model.paster(images, torch.Generator().manual_seed(1))
        maps = model.model.anomaly_map(pasted_images)
    assert maps[pasted].mean() > maps[~pasted].mean()
    assert auroc(maps.flatten(), pasted.flatten().long()) > 0.8


def test_fit_test_and_resume_through_the_cli(surfaces_root, tmp_path):
    main(["fit", *cli_args(surfaces_root, tmp_path), "--run.test_after_fit", "true"])
    run = tmp_path / "runs" / "densehybrid"
    (version,) = run.glob("*/version_0")
    results = json.loads((version / "results.json").read_text())["metrics"]
    assert {"test/target/pixel_auroc", "test/target/pixel_fpr95", "test/target/pixel_ap", "test/target/image_auroc", "test/target/pixel_aupro"} <= set(
        results)
    assert (version / "anomaly_maps.png").is_file()
    main(["fit", *cli_args(surfaces_root, tmp_path, steps=5), "--ckpt_path", "last"])
    assert torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert not any(run.glob("*/version_1")), "a resume continues in place"


def test_a_checkpoint_rebuilds_its_model_and_takes_only_scoring_options_at_test_time(surfaces_root, surfaces_line_b_root,
                                                                                     tmp_path):
    trained = ("--model.init_args.freeze", "none", "--model.init_args.paste_shape", "rectangle")
    main(["fit", *cli_args(surfaces_root, tmp_path, steps=2, extra=trained)])
    (version,) = (tmp_path / "runs" / "densehybrid").glob("*/version_0")
    checkpoint = version / "checkpoints" / "last.ckpt"
    stored = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert stored["freeze"] == "none" and stored["negatives"]["size"] == 24
    loaded = DenseHybridAD.load_from_checkpoint(checkpoint, map_location="cpu")
    assert loaded.model.freeze == "none" and loaded.negatives.segmentation == "slic"
    tested = main(["test", *cli_args(surfaces_root, tmp_path, extra=trained), "--ckpt_path", str(checkpoint),
                   "--model.init_args.anomaly_score", "energy"])
    assert tested.model.anomaly_score == "energy" and tested.model.model.freeze == "none"
    # ShiftAD's recalibration is a test-time option too: AdaBN toward 2 shots of line B, decided per layer.
    recalibrated = main(["test", *cli_args(surfaces_root, tmp_path, extra=trained), *embedded_line_b(surfaces_line_b_root),
                         *NO_SHIFT, "--config", "configs/densehybrid/target_recalibration.yaml",
                         "--data.init_args.target_shots", "2", "--ckpt_path", str(checkpoint)])
    assert recalibrated.model.target_recalibration == RecalibrationSpec(prior_count=2)
    folder = Path(recalibrated.trainer.default_root_dir)
    (kept,), (share,) = logged(folder, "adapt/kept").values(), logged(folder, "adapt/layers_kept").values()
    assert kept == float(share > 0) and 0 <= share <= 1
    assert {"test/target/image_auroc", "test/source/image_auroc"} <= set(
        json.loads((folder / "results.json").read_text())["metrics"])
    # The paper config's freeze (all) would train another model: refused, naming both values.
    with pytest.raises(ValueError, match=r"model.init_args.freeze: checkpoint 'none', config 'all'"):
        main(["test", *cli_args(surfaces_root, tmp_path), "--ckpt_path", str(checkpoint)])


def test_unknown_keys_of_the_nested_options_are_named():
    with pytest.raises(ValueError, match=r"^negatives has unknown key\(s\) \['sizee'\]; expected some of \['source'"):
        DenseHybridAD(negatives={"sizee": 3})
    with pytest.raises(ValueError, match=r"^backbone has unknown key\(s\) \['nmae'\]; expected some of \['name'"):
        DenseHybridAD(backbone={"nmae": "resnet18"})


def test_primary_task_category_in_bf16_mixed(surfaces_root, tmp_path):
    extra = ("--data.init_args.source.category", "[brick, woven]", "--model.init_args.primary_task", "category",
             "--model.init_args.num_classes", "2", "--model.init_args.paste_shape", "mixed",
             "--trainer.precision", "bf16-mixed")
    main(["fit", *cli_args(surfaces_root, tmp_path, extra=extra), "--trainer.log_every_n_steps", "1",
          "--run.test_after_fit", "true"])
    (version,) = (tmp_path / "runs" / "densehybrid").glob("*/version_0")
    logged = {row["step"]: row for row in csv.DictReader((version / "metrics.csv").open())}
    category_ce = [float(row["train/category_ce"]) for row in logged.values() if row.get("train/category_ce")]
    assert len(category_ce) == 3 and all(np.isfinite(category_ce))
    assert "test/target/pixel_auroc" in json.loads((version / "results.json").read_text())["metrics"]
    with pytest.raises(ValueError, match="num_classes"):
        main(["fit", *cli_args(surfaces_root, tmp_path, extra=(*extra[:-2], "--model.init_args.num_classes", "1"))])
