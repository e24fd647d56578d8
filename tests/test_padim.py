"""PaDiM: streaming statistics, Mahalanobis scoring, checkpoints, bf16, and 2-process DDP = 1 process."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import main
from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.padim import DamagedStatisticsError, NotFittedError, Padim, PadimModel

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--run.wandb", "false"]


@pytest.fixture(scope="module")
def model() -> PadimModel:
    return PadimModel(BackboneSpec(), layers=[1, 2, 3], num_features=8, seed=0)


def test_channel_subset_is_fixed_by_seed_and_checked():
    first = PadimModel(BackboneSpec(), [1, 2, 3], num_features=50, seed=3)
    again = PadimModel(BackboneSpec(), [1, 2, 3], num_features=50, seed=3)
    other = PadimModel(BackboneSpec(), [1, 2, 3], num_features=50, seed=4)
    assert torch.equal(first.channel_index, again.channel_index)
    assert not torch.equal(first.channel_index, other.channel_index)
    assert first.embed(torch.rand(2, 3, 64, 64)).shape == (2, 50, 16, 16)  # 24+40+112 channels at stride 4
    with pytest.raises(ValueError, match=r"num_features must be in \[1, 176\]"):
        PadimModel(BackboneSpec(), [1, 2, 3], num_features=177)


def test_streaming_statistics_equal_numpy_cov(model):
    model.reset_statistics()
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, size=(23, 8, 3, 2)) * rng.uniform(0.1, 5, size=(1, 8, 1, 1))
    for chunk in np.array_split(features, [5, 6, 17]):  # uneven batches, one of a single image
        model.accumulate(torch.from_numpy(chunk).float())
    assert int(model.count) == 23
    covariance = model.covariance() - 0.01 * torch.eye(8, dtype=torch.float64)
    as_float = features.astype(np.float32).astype(np.float64)
    for position in range(6):
        row, col = divmod(position, 2)
        samples = as_float[:, :, row, col]
        np.testing.assert_allclose(covariance[position].numpy(), np.cov(samples, rowvar=False), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose((model.feature_sum[position] / model.count).numpy(), samples.mean(0), rtol=1e-12)


def test_mahalanobis_equals_the_inverse_covariance_formula(model):
    model.reset_statistics()
    train = torch.randn(40, 8, 2, 2) * torch.linspace(0.5, 3, 8)[None, :, None, None]
    model.accumulate(train)
    query = torch.randn(3, 8, 2, 2) * 2
    distance = model.mahalanobis(query)
    mean = model.feature_sum / model.count
    precision = torch.linalg.inv(model.covariance())
    for position in range(4):
        diff = query.flatten(2)[:, :, position].double() - mean[position]
        expected = torch.einsum("bi,ij,bj->b", diff, precision[position], diff).sqrt()
        torch.testing.assert_close(distance.flatten(1)[:, position].double(), expected, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.mahalanobis(query.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="2x2 feature grid"):
        model.mahalanobis(torch.randn(1, 8, 3, 3))
    model.reset_statistics()
    with pytest.raises(NotFittedError):
        model.mahalanobis(query)


def test_fitted_statistics_survive_a_state_dict_round_trip():
    detector = Padim(num_features=10, blur_sigma=1.0)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    detector.model.accumulate(detector.model.embed(images))
    scores, maps = detector.anomaly_scores(images[:2])
    assert maps.shape == (2, 32, 32) and torch.equal(scores, maps.flatten(1).amax(1))
    restored = Padim(num_features=10, blur_sigma=1.0)
    restored.load_state_dict(detector.state_dict())
    assert restored.model.outer_sum.dtype == torch.float64
    torch.testing.assert_close(restored.anomaly_scores(images[:2])[1], maps)


def damaged(state: dict, prefix: str, how: str) -> dict:
    """A copy of a fitted PaDiM state dict with its statistics damaged the way ``how`` says."""
    state = dict(state)
    outer, features = prefix + "outer_sum", prefix + "feature_sum"
    if how == "nan":
        state[features] = state[features].clone()
        state[features][3, 1] = float("nan")
    elif how == "garbage":
        state[outer] = torch.randn(state[outer].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    elif how == "not_positive_definite":
        state[outer] = -state[outer]
    elif how == "shape":
        state[features] = state[features][:-1]
    return state


@pytest.mark.parametrize(("how", "problem"), [("nan", "feature_sum holds NaN"), ("garbage", "not symmetric"),
                                              ("shape", "do not fit"), ("not_positive_definite", "not positive definite")])
def test_damaged_statistics_are_caught_on_load_or_when_finalised(how, problem):
    detector = Padim(num_features=10, blur_sigma=1.0)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    detector.model.accumulate(detector.model.embed(images))
    restored = Padim(num_features=10, blur_sigma=1.0)
    with pytest.raises(DamagedStatisticsError, match=f"from a loaded state dict are damaged: .*{problem}"):
        restored.load_state_dict(damaged(detector.state_dict(), "model.", how))
        restored.anomaly_scores(images[:2])


def padim_args(root: Path, runs: Path) -> list[str]:
    return ["--config", str(REPO / "configs/trainer/default.yaml"), "--config",
            str(REPO / "configs/padim/padim_surfaces.yaml"), *QUIET, "--run.root", str(runs),
            "--data.init_args.source.root", str(root), "--data.init_args.image_size", "64",
            "--data.init_args.resize_size", "null", "--data.init_args.batch_size", "4",
            "--model.init_args.num_features", "12", "--model.init_args.blur_sigma", "2.0"]


def gaussians(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    model = PadimModel(BackboneSpec(), [1, 2, 3], num_features=12)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.count, model.feature_sum / model.count, model.covariance()


def test_plain_ddp_is_refused_with_a_pointer_to_ddp_frozen():
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DDPStrategy

    detector = Padim(num_features=10)
    detector.trainer = Trainer(strategy=DDPStrategy(), accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match="ddp_frozen"):
        detector.setup("fit")


def test_fit_and_test_under_bf16_through_the_cli(tmp_path, surfaces_root):
    main(["fit", *padim_args(surfaces_root, tmp_path), "--trainer.precision", "bf16-mixed",
          "--run.test_after_fit", "true"])
    run_dir = tmp_path / "padim" / "surfaces-brick-none-to-none" / "version_0"
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert {"test/target/image_auroc", "test/target/pixel_auroc", "test/target/pixel_aupro"} <= set(metrics)
    assert "val/normal_score" in (run_dir / "metrics.csv").read_text()
    # The lazily shaped statistics come back from the checkpoint: a later test gives the same numbers.
    main(["test", *padim_args(surfaces_root, tmp_path), "--trainer.precision", "bf16-mixed", "--ckpt_path", "last"])
    again = json.loads((run_dir.parent / "version_1" / "results.json").read_text())["metrics"]
    assert again["test/target/pixel_auroc"] == pytest.approx(metrics["test/target/pixel_auroc"], abs=1e-6)
    # A checkpoint damaged inside (the zip intact) is refused with its path, not a linear-algebra error.
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["state_dict"] = damaged(checkpoint["state_dict"], "model.", "not_positive_definite")
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(DamagedStatisticsError, match=f"from checkpoint {broken} are damaged: .*not positive definite"):
        main(["test", *padim_args(surfaces_root, tmp_path), "--ckpt_path", str(broken)])
