import csv
import json
import math
from pathlib import Path

import pytest
import torch

from cli import main
from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.components.cross_scale_flow import CrossScaleFlow, soft_clamp
from lightning_modules.csflow import CSFlow, CSFlowAdaptation, CSFlowModel
from lightning_modules.csflow.lightning_model import FeatureCache
from lightning_modules.csflow.torch_model import mbconv_block_names

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--run.wandb", "false",
         "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1"]
TINY_SHAPES = [(4, 3, 3), (4, 2, 2), (4, 1, 1)]
SOURCE_TAG = "surfaces-brick-none-to-gray"
ADAPT_TAG = "surfaces-brick-none-to-gray-on-shots-k1-f0"


def tiny_flow(dtype=torch.float32) -> CrossScaleFlow:
    torch.manual_seed(0)
    flow = CrossScaleFlow(TINY_SHAPES, hidden_channels=6, kernel_sizes=(3, 5), clamp=3.0)
    # Gains start at 0 (identity); give them values so the test sees a non-trivial map.
    for name, param in flow.named_parameters():
        if name.endswith("gains"):
            param.data.uniform_(0.5, 1.5)
    return flow.to(dtype)


def tiny_inputs(batch: int, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, *shape, generator=generator).to(dtype) for shape in TINY_SHAPES]


def source_args(surfaces_root, run_root, steps=2, extra=()):
    return ["--config", str(REPO / "configs/csflow/source_surfaces.yaml"),
            "--data.init_args.source.root", str(surfaces_root),
            "--data.init_args.image_size", "64", "--model.init_args.image_size", "64",
            "--model.init_args.hidden_channels", "8", "--data.init_args.batch_size", "4",
            "--trainer.max_steps", str(steps), "--trainer.check_val_every_n_epoch", "1",
            "--run.root", str(run_root), *QUIET, *extra]


def adapt_args(surfaces_root, run_root, source_ckpt, steps=2, extra=()):
    return ["--config", str(REPO / "configs/csflow/adapt_gray.yaml"), "--data.init_args.source.root", str(surfaces_root),
            "--data.init_args.image_size", "64", "--model.init_args.source_checkpoint", str(source_ckpt),
            "--trainer.max_steps", str(steps), "--run.root", str(run_root), *QUIET, *extra]


def last_ckpt(run_root: Path, method: str, tag: str, version: int = 0) -> Path:
    return run_root / method / tag / f"version_{version}" / "checkpoints" / "last.ckpt"


def logged_once(run_dir: Path, key: str) -> float:
    """The one value of ``key`` in a run's metrics.csv."""
    values = [row[key] for row in csv.DictReader((run_dir / "metrics.csv").open()) if row.get(key)]
    assert len(values) == 1, f"{key} logged {len(values)} times"
    return float(values[0])


@pytest.fixture(scope="module")
def source_checkpoint(surfaces_root, tmp_path_factory) -> Path:
    run_root = tmp_path_factory.mktemp("csflow_source")
    main(["fit", *source_args(surfaces_root, run_root, steps=3)])
    return last_ckpt(run_root, "csflow", SOURCE_TAG)


def test_soft_clamp_is_bounded_and_near_identity_at_zero():
    s = torch.tensor([-1e6, -0.01, 0.0, 0.01, 1e6])
    clamped = soft_clamp(s, 3.0)
    assert clamped.abs().max() < 3.0
    assert torch.allclose(clamped[1:4], 0.636 * s[1:4] * 1.0, atol=1e-3)


def test_flow_starts_as_the_identity_because_gains_start_at_zero():
    flow = CrossScaleFlow(TINY_SHAPES, hidden_channels=6, kernel_sizes=(3, 5))
    x = tiny_inputs(2)
    z, log_det = flow(x)
    # Only the fixed permutations act.
    assert sorted(z[0][0].flatten().tolist()) == sorted(x[0][0].flatten().tolist())
    assert torch.equal(log_det, torch.zeros(2))


def test_flow_is_invertible_in_float32_and_log_det_is_per_sample():
    flow = tiny_flow()
    x = tiny_inputs(5)
    z, log_det = flow(x)
    assert log_det.shape == (5,)
    x_back, inverse_log_det = flow.inverse(z)
    assert max((a - b).abs().max().item() for a, b in zip(x, x_back, strict=True)) < 1e-4
    assert torch.allclose(log_det, -inverse_log_det, atol=1e-4)
    assert log_det.abs().min() > 0.1, "the test flow should not be volume preserving"


def test_analytic_log_det_matches_the_numerical_jacobian():
    flow = tiny_flow(torch.float64)
    x = tiny_inputs(2, torch.float64)
    sizes = [t[0].numel() for t in x]

    def flat_map(flat: torch.Tensor) -> torch.Tensor:
        parts = [p.view(1, *shape) for p, shape in zip(flat.split(sizes), TINY_SHAPES, strict=True)]
        return torch.cat([t.flatten() for t in flow(parts)[0]])

    _, log_det = flow(x)
    for sample in range(2):
        flat = torch.cat([t[sample].flatten() for t in x])
        jacobian = torch.autograd.functional.jacobian(flat_map, flat)
        assert jacobian.shape == (flow.dims, flow.dims)
        numerical = torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(log_det[sample], numerical, atol=1e-8), (log_det[sample], numerical)


def test_nll_and_scores_follow_the_paper_formulas():
    model = CSFlowModel(BackboneSpec(), "blocks.5.3", image_size=64, hidden_channels=8, kernel_sizes=(3,))
    z = [torch.full((2, *shape), 2.0) for shape in model.flow.shapes]
    log_det = torch.tensor([0.0, float(model.flow.dims)])
    assert torch.allclose(model.nll(z, log_det), torch.tensor([2.0, 1.0]))
    scores, maps = model.anomaly_scores(z, (64, 64))
    assert torch.allclose(scores, torch.full((2,), 2.0)) and maps.shape == (2, 64, 64)
    assert torch.allclose(maps, torch.full_like(maps, 4.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flow_runs_in_float32_under_autocast(dtype):
    flow = tiny_flow()
    x = [t * 50 for t in tiny_inputs(3)]
    with torch.autocast("cpu", dtype=dtype):
        z, log_det = flow([t.to(dtype) for t in x])
    assert z[0].dtype == torch.float32 and log_det.dtype == torch.float32
    reference, reference_log_det = flow([t.to(dtype).float() for t in x])
    assert torch.equal(log_det, reference_log_det) and torch.isfinite(log_det).all()


def test_feature_cache_extracts_each_image_once():
    cache, calls = FeatureCache(), []

    def extract(images):
        calls.append(images.shape[0])
        return [images.mean(1, keepdim=True), images[:, :, ::2, ::2]]

    images = torch.rand(4, 3, 8, 8)
    first = cache.features(images, extract)
    again = cache.features(images[[2, 0]], extract)
    assert calls == [4] and len(cache) == 4
    assert torch.equal(again[1], first[1][[2, 0]])
    cache.features(torch.cat([images[:1], torch.rand(1, 3, 8, 8)]), extract)
    assert calls == [4, 1]


def test_adaptation_picks_the_first_mbconv_blocks_and_rejects_bad_values(source_checkpoint, tmp_path):
    model = CSFlowAdaptation(str(source_checkpoint), adapt_blocks=5)
    assert model.adapted_modules == [f"extractor.body.blocks.{b}" for b in ("0.0", "1.0", "1.1", "2.0", "2.1")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.extractor.body.blocks.") for n in trainable)
    assert {n.split(".")[4] + "." + n.split(".")[5] for n in trainable} == {"0.0", "1.0", "1.1", "2.0", "2.1"}
    assert len(mbconv_block_names(model.model.extractor)) == 15  # Lite0 stages 1-6 up to blocks.5.3
    with pytest.raises(ValueError, match="adapt_blocks must be in"):
        CSFlowAdaptation(str(source_checkpoint), adapt_blocks=99)
    with pytest.raises(ValueError, match="bn_policy"):
        CSFlowAdaptation(str(source_checkpoint), bn_policy="running")
    with pytest.raises(FileNotFoundError, match="source_checkpoint"):
        CSFlowAdaptation(str(tmp_path / "missing.ckpt"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({**torch.load(source_checkpoint, weights_only=True), "shiftad_method": "DANN"}, foreign)
    with pytest.raises(ValueError, match="phase-1 'CSFlow'"):
        CSFlowAdaptation(str(foreign))


def test_fit_adapt_test_chain_keeps_flow_and_later_blocks_bitwise(surfaces_root, source_checkpoint, tmp_path):
    main(["fit", *adapt_args(surfaces_root, tmp_path, source_checkpoint, steps=3,
                             extra=["--run.test_after_fit", "true"])])
    run_dir = tmp_path / "csflow_adapt" / ADAPT_TAG / "version_0"
    results = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert 0.0 <= results["test/target/image_auroc"] <= 1.0 and "test/target/pixel_aupro" in results

    before = torch.load(source_checkpoint, weights_only=True)["state_dict"]
    after = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    adapted = ("blocks.0.", "blocks.1.", "blocks.2.")
    changed = {k for k in before if k.startswith("model.") and not torch.equal(before[k], after[k])}
    assert changed, "the adapted blocks must change"
    assert all(k.startswith("model.extractor.body.") and k.split("body.")[1].startswith(adapted) for k in changed)
    assert any("blocks.0.0.conv_dw.weight" in k for k in changed) and any("blocks.2.1." in k for k in changed)
    for key in before:
        if key.startswith("model.flow.") or "blocks.3." in key or "blocks.5." in key or "conv_stem" in key:
            assert torch.equal(before[key], after[key]), key

    # Testing the adapted run again rebuilds it from its checkpoint.
    main(["test", *adapt_args(surfaces_root, tmp_path, source_checkpoint), "--ckpt_path", "last"])
    assert (tmp_path / "csflow_adapt" / ADAPT_TAG / "version_1" / "results.json").is_file()


def test_frozen_bn_policy_keeps_source_running_statistics(surfaces_root, source_checkpoint, tmp_path):
    main(["fit", *adapt_args(surfaces_root, tmp_path, source_checkpoint, steps=2,
                             extra=["--model.init_args.bn_policy", "frozen"])])
    before = torch.load(source_checkpoint, weights_only=True)["state_dict"]
    after = torch.load(last_ckpt(tmp_path, "csflow_adapt", ADAPT_TAG), weights_only=True)["state_dict"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in before if "blocks.0.0.conv_dw" in k)


def test_image_size_mismatch_is_a_clear_error(surfaces_root, tmp_path):
    with pytest.raises(ValueError, match="data image_size=32 but the flow was built for image_size=64"):
        main(["fit", *source_args(surfaces_root, tmp_path, extra=["--data.init_args.image_size", "32"])])


def test_bf16_mixed_on_cpu_keeps_the_flow_finite(surfaces_root, source_checkpoint, tmp_path):
    bf16 = ["--trainer.precision", "bf16-mixed"]
    main(["fit", *source_args(surfaces_root, tmp_path, steps=2, extra=[*bf16, "--run.test_after_fit", "true"])])
    results = json.loads((tmp_path / "csflow" / SOURCE_TAG / "version_0" / "results.json").read_text())["metrics"]
    assert 0.0 <= results["test/target/image_auroc"] <= 1.0
    model = CSFlow.load_from_checkpoint(last_ckpt(tmp_path, "csflow", SOURCE_TAG), weights_only=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.model.features(torch.rand(2, 3, 64, 64))
        z, log_det = model.model.flow(features)
    assert features[0].dtype == torch.bfloat16 and z[0].dtype == torch.float32 and log_det.dtype == torch.float32
    assert torch.isfinite(log_det).all() and all(torch.isfinite(t).all() for t in z)
    main(["fit", *adapt_args(surfaces_root, tmp_path, source_checkpoint, steps=2, extra=bf16)])


def test_regularised_adaptation_pulls_toward_the_source_and_logs_the_safety_decision(surfaces_root, source_checkpoint,
                                                                                      tmp_path):
    extra = ["--config", str(REPO / "configs/csflow/adapt_regularised.yaml"), "--model.init_args.l2_sp", "1000"]
    main(["fit", *adapt_args(surfaces_root, tmp_path, source_checkpoint, steps=3, extra=extra)])
    run_dir = tmp_path / "csflow_adapt" / ADAPT_TAG / "version_0"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/l2_sp", "adapt/kept", "adapt/pseudo_defect_auroc_adapted",
            "adapt/pseudo_defect_auroc_source"} <= set(header)
    kept = logged_once(run_dir, "adapt/kept")
    assert kept in (0.0, 1.0)

    before = torch.load(source_checkpoint, weights_only=True)["state_dict"]
    after = torch.load(last_ckpt(tmp_path, "csflow_adapt", ADAPT_TAG), weights_only=True)["state_dict"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)  # bn_policy frozen
    changed = [k for k in before if k.startswith("model.") and not torch.equal(before[k], after[k])]
    assert bool(changed) == (kept == 1.0), f"{changed[:5]}: declined must leave the source blocks, kept the adapted ones"


def test_the_phase2_safety_rule_restores_the_source_blocks_after_a_harmful_update(surfaces_root, source_checkpoint,
                                                                                  tmp_path, monkeypatch):
    """Constructed harmful updates: a diverged one (a non-finite weight, so no score can be trusted) is declined
    and the source blocks come back bitwise; with the rule off, the same update stays and is still measured."""
    from datamodules import OneClassDataModule

    model = CSFlowAdaptation(str(source_checkpoint), adapt_blocks=2, safety=True)
    data = OneClassDataModule(source={"dataset": "surfaces", "root": str(surfaces_root), "category": "brick"},
                              target={"shift": "gray"}, image_size=64, batch_size=4, train_on="target_shots",
                              target_shots=2, num_workers=0)
    data.setup("fit")
    logged = []
    monkeypatch.setattr(model, "log_dict", lambda metrics, **kwargs: logged.append(metrics))
    source = {name: value.detach().clone() for name, value in model.adapted_state().items()}

    def diverge() -> None:
        model.adapted_state()["extractor.body.blocks.0.0.conv_dw.weight"].data.fill_(float("nan"))

    diverge()
    assert model.apply_safety_rule(data) is False
    assert all(torch.equal(value, source[name]) for name, value in model.adapted_state().items())
    assert logged[-1]["adapt/kept"] == 0.0 and math.isnan(logged[-1]["adapt/pseudo_defect_auroc_adapted"])

    model.safety = False
    diverge()
    assert model.apply_safety_rule(data) is True
    assert model.adapted_state()["extractor.body.blocks.0.0.conv_dw.weight"].isnan().all()
    assert "adapt/kept" not in logged[-1] and "adapt/pseudo_defect_auroc_source" in logged[-1]


def test_pseudo_defect_separation_ranks_an_oracle_first_and_a_blind_scorer_at_chance():
    from lightning_modules.components.pseudo_defect_check import pseudo_defect_set, separation, verdict

    shots = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images, labels = pseudo_defect_set(shots, "flips")
    assert images.shape == (8 * 3, 3, 32, 32) and labels.tolist() == [0] * 8 + [1] * 16
    again, _ = pseudo_defect_set(shots, "flips")
    assert torch.equal(images, again)  # the same copies for the same shots
    clean = torch.cat([shots, shots.flip(-1), shots.flip(-2), shots.flip(-2, -1)])

    def oracle(chunk: torch.Tensor) -> torch.Tensor:  # distance to the nearest clean view
        return torch.cdist(chunk.flatten(1), clean.flatten(1)).amin(1)

    assert separation(oracle, images, labels) == 1.0
    assert separation(lambda chunk: torch.zeros(len(chunk)), images, labels) == 0.5
    assert verdict(0.7, 0.8).kept is False and verdict(0.8, 0.8).kept is True
    assert verdict(float("nan"), 0.8).kept is False


def test_cycled_flips_show_each_image_in_turn_as_its_four_flips():
    from lightning_modules.components.target_recalibration import cycled_flips, label_preserving_views

    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = label_preserving_views(images, "flips").view(4, *images.shape)
    for step in range(5):
        shown = cycled_flips(images, step)
        for b in range(2):
            assert torch.equal(shown[b], views[(step + b) % 4, b])


def test_flow_tuning_updates_the_flow_alone_and_resumes_with_the_same_anchor(surfaces_root, source_checkpoint, tmp_path):
    extra = ["--config", str(REPO / "configs/csflow/adapt_flow.yaml"), "--model.init_args.l2_sp", "0.5"]
    main(["fit", *adapt_args(surfaces_root, tmp_path, source_checkpoint, steps=3, extra=extra)])
    before = torch.load(source_checkpoint, weights_only=True)["state_dict"]
    after = torch.load(last_ckpt(tmp_path, "csflow_adapt", ADAPT_TAG), weights_only=True)["state_dict"]
    changed = {k for k in before if k.startswith("model.") and not torch.equal(before[k], after[k])}
    kept = logged_once(tmp_path / "csflow_adapt" / ADAPT_TAG / "version_0", "adapt/kept")
    assert bool(changed) == (kept == 1.0), "declined must leave the source flow, kept the tuned one"
    assert all(k.startswith("model.flow.") for k in changed)
    model = CSFlowAdaptation(str(source_checkpoint), adapt_blocks=0, adapt_flow=True, l2_sp=0.5)
    assert model.adapted_modules == ["flow"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("model.flow.")}
    with pytest.raises(ValueError, match="0 only with adapt_flow or adapt_stem"):
        CSFlowAdaptation(str(source_checkpoint), adapt_blocks=0)
