"""Few-shot target recalibration of PaDiM, CS-Flow and DenseHybrid: the update as defined, the safety rule, no
target label on the path, and the runs through cli.py."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cli import main
from lightning_modules.components import target_recalibration
from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.components.batchnorm_statistics import (
    BatchNormStatistics,
    anchored_statistics,
    input_moments,
    named_batch_norms,
    trained_batch_norms,
)
from lightning_modules.components.target_recalibration import (
    Gaussians,
    Moments,
    RecalibrationSpec,
    as_recalibration_spec,
    batchnorm_recalibration,
    channel_aligned,
    flow_output_recalibration,
    label_preserving_views,
    recalibrated,
    safety_check,
    shrunk,
    train_split_mismatch,
    views_per_shot,
)
from lightning_modules.csflow import CSFlow, CSFlowAdaptation
from lightning_modules.csflow import lightning_model as csflow_lightning_model
from lightning_modules.densehybrid import DenseHybridAD
from lightning_modules.padim import Padim, PadimModel
from tests.methods import csflow_args, padim_args, results
from tests.test_real_target import NO_SHIFT, embedded_line_b, logged


def random_gaussians(positions: int, dim: int, seed: int = 0) -> Gaussians:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(positions, dim, dim, generator=generator, dtype=torch.float64)
    covariance = factor @ factor.transpose(1, 2) / dim + 0.5 * torch.eye(dim, dtype=torch.float64)
    return Gaussians(torch.randn(positions, dim, generator=generator, dtype=torch.float64), covariance)


def test_channel_alignment_scores_a_target_feature_as_its_standardised_copy_under_the_source():
    source = random_gaussians(positions=6, dim=3)
    shots = torch.randn(4, 6, 3, dtype=torch.float64) * torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64) + 2
    aligned = channel_aligned(source, Moments.of(shots))
    # the channel frames: source from the Gaussians' mixture over positions, target from every shot sample
    source_mean = source.mean.mean(0)
    source_std = ((source.covariance.diagonal(dim1=-2, dim2=-1) + source.mean.square()).mean(0)
                  - source_mean.square()).sqrt()
    target_mean, target_std = shots.flatten(0, 1).mean(0), shots.flatten(0, 1).std(0, unbiased=False)

    def mahalanobis(gaussians: Gaussians, x: torch.Tensor) -> torch.Tensor:
        offset = x - gaussians.mean
        return (offset[:, None, :] @ torch.linalg.solve(gaussians.covariance, offset[:, :, None])).flatten()

    x = torch.randn(6, 3, dtype=torch.float64) * 2 + 1
    standardised = source_mean + (x - target_mean) / target_std * source_std
    torch.testing.assert_close(mahalanobis(aligned, x), mahalanobis(source, standardised))
    # its mixture over positions has the shots' channel mean and spread
    torch.testing.assert_close(aligned.mean.mean(0), target_mean)
    spread = (aligned.covariance.diagonal(dim1=-2, dim2=-1) + aligned.mean.square()).mean(0) - target_mean.square()
    torch.testing.assert_close(spread.sqrt(), target_std)
    # the shrinkage then starts from the aligned Gaussians
    spec = RecalibrationSpec(prior_count=5, align_channels=True)
    torch.testing.assert_close(recalibrated(source, Moments.of(shots), spec).mean,
                               shrunk(aligned, Moments.of(shots), 5).mean)


def test_shrinkage_is_the_mixture_of_the_prior_and_the_shots():
    prior = random_gaussians(positions=3, dim=4)
    shots = torch.randn(5, 3, 4, dtype=torch.float64) * 2 + 1  # [n, P, D]
    update = shrunk(prior, Moments.of(shots), prior_count=7)
    # The same moments in their second-moment form: E[x] and E[xxᵀ] of the mixture (prior weight 7, each shot 1).
    mean = (7 * prior.mean + shots.sum(0)) / 12
    second = (7 * (prior.covariance + prior.mean[:, :, None] * prior.mean[:, None, :])
              + torch.einsum("npi,npj->pij", shots, shots)) / 12
    torch.testing.assert_close(update.mean, mean)
    torch.testing.assert_close(update.covariance, second - mean[:, :, None] * mean[:, None, :])
    # The shots' weight grows with k: the mean moves further toward them.
    toward = [(shrunk(prior, Moments.of(shots[:k]), 7).mean - prior.mean).norm() for k in (1, 5)]
    assert toward[0] < toward[1]


def test_padim_statistics_round_trip_through_the_sums():
    model = PadimModel(BackboneSpec(), [1, 2, 3], num_features=6)
    model.accumulate(torch.randn(9, 6, 2, 2))
    before = model.gaussians()
    update = recalibrated(before, Moments.of(torch.randn(3, 4, 6) + 2), RecalibrationSpec(prior_count=5))
    model.set_gaussians(update, count=8)
    after = model.gaussians()
    torch.testing.assert_close(after.mean, update.mean)
    torch.testing.assert_close(after.covariance, update.covariance)
    model.check_statistics()


def shifted_shots(offsets: torch.Tensor, views: int = 4, positions: int = 8, dim: int = 5) -> torch.Tensor:
    """[k, V, P, D]: each shot's views drawn around the source N(0, I) plus that shot's offset."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(offsets.shape[0], views, positions, dim, generator=generator, dtype=torch.float64)
    return noise + offsets[:, None, None, :]


def test_the_safety_rule_keeps_a_consistent_shift_and_declines_shots_that_disagree():
    source = Gaussians(torch.zeros(8, 5, dtype=torch.float64), torch.eye(5, dtype=torch.float64).expand(8, 5, 5))
    spec = RecalibrationSpec(prior_count=4)
    consistent = safety_check(source, shifted_shots(torch.full((4, 5), 3.0, dtype=torch.float64)), spec, 0.01)
    assert consistent.kept and consistent.adapted_nll < consistent.source_nll and consistent.held_out == "shots"
    # Harmful: each shot is off in its own direction, so an update fitted on the others misfits the one left out.
    disagreeing = 6.0 * torch.eye(5, dtype=torch.float64)[:4]
    harmful = safety_check(source, shifted_shots(disagreeing), spec, 0.01)
    assert not harmful.kept and harmful.adapted_nll > harmful.source_nll
    # One shot: half of its views are held out.
    single = safety_check(source, shifted_shots(torch.full((1, 5), 3.0, dtype=torch.float64)), spec, 0.01)
    assert single.kept and single.held_out == "views"


def test_auto_alignment_takes_the_variant_with_the_lower_held_out_nll():
    """Shots whose every channel is scaled and offset (a colour or gain change): the aligned update explains the
    held-out shots better, and ``auto`` takes it; its NLL is the lower of the two fixed choices."""
    source = random_gaussians(positions=8, dim=5)
    generator = torch.Generator().manual_seed(1)
    samples = source.mean + (torch.linalg.cholesky(source.covariance)
                             @ torch.randn(4, 4, 8, 5, 1, generator=generator, dtype=torch.float64))[..., 0]
    shots = samples * torch.tensor([3.0, 0.3, 2.0, 1.0, 0.5], dtype=torch.float64) + 4  # [k, V, P, D]
    fixed = {aligned: safety_check(source, shots, RecalibrationSpec(prior_count=16, align_channels=aligned), 0.01)
             for aligned in (False, True)}
    auto = safety_check(source, shots, RecalibrationSpec(prior_count=16, align_channels="auto"), 0.01)
    assert fixed[True].adapted_nll < fixed[False].adapted_nll
    assert auto.aligned and auto.adapted_nll == fixed[True].adapted_nll and auto.kept
    assert not fixed[False].aligned and fixed[True].aligned
    with pytest.raises(ValueError, match="align_channels must be true, false or auto, got 'yes'"):
        RecalibrationSpec(align_channels="yes")
    with pytest.raises(ValueError, match="align_channels auto is decided by safety_check"):
        recalibrated(source, Moments.of(shots.flatten(0, 1)), RecalibrationSpec(align_channels="auto"))


def test_views_per_shot_puts_view_v_of_shot_i_at_i_v_for_every_output_and_chunking():
    images = torch.rand(3, 3, 4, 4)
    expected = label_preserving_views(images, "flips").reshape(4, 3, 3, 4, 4).transpose(0, 1)
    for batch_size in (1, 5, 32):
        plain, doubled = views_per_shot(lambda chunk: [chunk, 2 * chunk[:, :1]], images, "flips", batch_size)
        assert torch.equal(plain, expected) and torch.equal(doubled, 2 * expected[:, :, :1])
        assert torch.equal(plain[1, 2], images[1].flip(-2))  # shot 1, its up-down flip


def test_spec_errors_name_the_key():
    with pytest.raises(ValueError, match="target_recalibration.prior_count"):
        RecalibrationSpec(prior_count=0)
    with pytest.raises(ValueError, match="target_recalibration.views must be one of none, flips, got 'crops'"):
        RecalibrationSpec(views="crops")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['weight'\]"):
        as_recalibration_spec({"weight": 3})


class LabelGuardedShots(Dataset):
    """Target shots whose items raise on any key but ``image``: reading a label, mask or defect type fails."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]

        class Item(dict):
            def __getitem__(self, key):
                if key != "image":
                    raise AssertionError(f"the recalibration read the target shot's {key!r}")
                return image

        return Item()


class ShotsOnly:
    """A DataModule that has nothing but the unlabelled target shots (no test split to peek at)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def target_train_dataloader(self) -> DataLoader:
        return DataLoader(LabelGuardedShots(self.images), batch_size=2)


def test_recalibration_reads_only_the_shots_images():
    module = Padim(num_features=8, target_recalibration={"prior_count": 4})
    module.model.accumulate(module.model.embed(torch.rand(6, 3, 32, 32)))
    source = module.model.gaussians()
    module.recalibrate_to_target(ShotsOnly(torch.rand(3, 3, 32, 32) * 0.3 + 0.7))  # brighter: a shifted line
    assert not torch.equal(module.model.gaussians().mean, source.mean)  # kept: the shots are far from the source


def test_recalibrated_padim_through_cli_reports_both_domains(surfaces_root, surfaces_line_b_root, tmp_path):
    args = [*padim_args(surfaces_root, tmp_path, {}), *embedded_line_b(surfaces_line_b_root), *NO_SHIFT,
            "--config", str(Path(__file__).resolve().parents[1] / "configs" / "padim" / "target_recalibration.yaml"),
            "--data.init_args.target_shots", "2", "--run.test_after_fit", "true"]
    cli = main(["fit", *args])
    folder = Path(cli.trainer.default_root_dir)
    assert set(logged(folder, "adapt/kept").values()) <= {0.0, 1.0} and logged(folder, "adapt/kept")
    found = results(folder)
    assert {"test/target/image_auroc", "test/source/image_auroc"} <= found.keys()
    assert cli.model.target_recalibration == RecalibrationSpec(prior_count=64, views="flips", safety=True)


def test_flow_output_standardisation_moves_n01_toward_the_shots_and_declines_disagreeing_ones():
    spec = RecalibrationSpec(prior_count=3)
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 4), (2, 2), (1, 1)]
    shifted = [torch.randn(4, 4, 5, h, w, generator=generator, dtype=torch.float64) * 2 + 3 for h, w in shapes]
    standardisation, verdict = flow_output_recalibration(shifted, spec)
    assert verdict.kept and verdict.held_out == "shots"
    for z, mean in zip(shifted, standardisation.mean, strict=True):
        positions = z.shape[-1] * z.shape[-2]
        samples = z.permute(2, 0, 1, 3, 4).flatten(1)  # [C, k·V·h·w]
        # the prior N(0, 1) counts as prior_count images of h·w positions
        expected = samples.sum(1) / (spec.prior_count * positions + samples.shape[1])
        torch.testing.assert_close(mean, expected.float())
    # Each shot off in its own channel: an update fitted on the others misfits the one left out.
    disagreeing = [torch.randn(4, 4, 5, h, w, generator=generator, dtype=torch.float64) for h, w in shapes]
    for z in disagreeing:
        for shot in range(4):
            z[shot, :, shot] += 8.0
    _, harmful = flow_output_recalibration(disagreeing, spec)
    assert not harmful.kept and harmful.adapted_nll > harmful.source_nll


def test_csflow_checkpoint_is_recalibrated_at_test_time_through_cli(surfaces_root, surfaces_line_b_root, tmp_path):
    source_args = csflow_args(surfaces_root, tmp_path, {})
    fitted = main(["fit", *source_args, "--trainer.max_steps", "4"])
    checkpoint = Path(fitted.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    assert fitted.model.hparams["target_recalibration"] is None
    # A checkpoint from before the option existed: the key is absent, not None.
    older = torch.load(checkpoint, weights_only=True)
    del older["hyper_parameters"]["target_recalibration"]
    torch.save(older, tmp_path / "older.ckpt")
    config = Path(__file__).resolve().parents[1] / "configs" / "csflow" / "target_recalibration.yaml"
    for path in (checkpoint, tmp_path / "older.ckpt"):
        tested = main(["test", *source_args, *embedded_line_b(surfaces_line_b_root), *NO_SHIFT, "--config",
                       str(config), "--data.init_args.target_shots", "2", "--ckpt_path", str(path)])
        module = tested.model
        assert isinstance(module, CSFlow) and module.target_recalibration == RecalibrationSpec(prior_count=2)
        folder = Path(tested.trainer.default_root_dir)
        kept = logged(folder, "adapt/kept")
        assert kept and set(kept.values()) <= {0.0, 1.0}
        assert (module.model.z_mean_0 is not None) == (list(kept.values())[-1] == 1.0)
        assert {"test/target/image_auroc", "test/source/image_auroc"} <= results(folder).keys()
        assert module.calibration.is_fitted  # refitted on the validation split under the standardisation


def test_csflow_refuses_channel_alignment_by_name():
    model = CSFlow(image_size=64, hidden_channels=8, kernel_sizes=[3],
                   target_recalibration={"prior_count": 2, "align_channels": True})
    with pytest.raises(ValueError, match="align_channels moves PaDiM's per-position Gaussians"):
        model.recalibrate_to_target(datamodule=None)


def two_batchnorm_network() -> torch.nn.Sequential:
    """conv → BN → ReLU → conv → BN in eval mode, its BatchNorms holding some source statistics."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.Conv2d(4, 5, 1), torch.nn.BatchNorm2d(5)).eval()
    for layer in (network[1], network[4]):
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    return network


def shrunk_channel_moments(inputs: torch.Tensor, layer: torch.nn.BatchNorm2d, prior_images: int,
                           prior: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The definition: per channel, the source N(μ_s, σ_s²) (the layer's running statistics unless ``prior``) as
    prior_images·h·w samples, pooled with the n input values: mean (n₀μ_s + Σx)/(n₀ + n), variance
    (n₀σ_s² + S + n₀n/(n₀ + n)·(x̄ − μ_s)²)/(n₀ + n)."""
    values = inputs.double().transpose(0, 1).flatten(1)  # [C, n]
    n, n0 = values.shape[1], prior_images * inputs.shape[-2] * inputs.shape[-1]
    source_mean, source_var = (t.double() for t in (prior or (layer.running_mean, layer.running_var)))
    mean = values.mean(1)
    scatter = (values - mean[:, None]).square().sum(1)
    return ((n0 * source_mean + values.sum(1)) / (n0 + n),
            (n0 * source_var + scatter + n0 * n / (n0 + n) * (mean - source_mean).square()) / (n0 + n))


def test_batchnorm_recalibration_shrinks_each_layer_toward_its_input_over_the_shots_in_forward_order():
    network = two_batchnorm_network()
    source = copy_of_statistics(network)
    images = torch.rand(3, 3, 8, 8) + 0.5  # brighter than anything the source statistics saw
    spec = RecalibrationSpec(prior_count=2, views="flips", safety=False)
    # given last-first: the layers are still estimated in the order the forward pass reaches them
    verdicts = batchnorm_recalibration(network, [("4", network[4]), ("1", network[1])], images, spec)
    assert verdicts.names == ["1", "4"] and verdicts.kept_share == 1.0
    views = label_preserving_views(images, "flips")
    first_input = network[0](views)
    reference = torch.nn.Sequential(*two_batchnorm_network()).eval()  # the source statistics, then the update
    mean, var = shrunk_channel_moments(first_input, reference[1], spec.prior_count)
    torch.testing.assert_close(network[1].running_mean, mean.float())
    torch.testing.assert_close(network[1].running_var, var.float())
    # the second layer's input is computed with the first layer's new statistics
    second_input = network[3](network[2](network[1](first_input)))
    mean, var = shrunk_channel_moments(second_input, reference[4], spec.prior_count)
    torch.testing.assert_close(network[4].running_mean, mean.float())
    torch.testing.assert_close(network[4].running_var, var.float())
    assert not torch.equal(network[4].running_mean, source["4.running_mean"])


def copy_of_statistics(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in network.state_dict().items() if "running" in key}


def test_batchnorm_recalibration_declines_a_layer_whose_held_out_shots_disagree():
    network = two_batchnorm_network()
    network[0].weight.data.zero_()
    network[0].bias.data.zero_()
    with torch.no_grad():  # the first conv passes each input channel to its own channel: identity on 3 of 4
        for channel in range(3):
            network[0].weight[channel, channel, 1, 1] = 1.0
    source = copy_of_statistics(network)
    generator = torch.Generator().manual_seed(1)
    # Each shot far off in its own channel: an update fitted on the other shots misfits the one left out.
    disagreeing = torch.randn(3, 3, 8, 8, generator=generator) * 0.1
    for shot in range(3):
        disagreeing[shot, shot] += 8.0
    verdicts = batchnorm_recalibration(network, [("1", network[1]), ("4", network[4])], disagreeing,
                                       RecalibrationSpec(prior_count=2))
    first = verdicts.verdicts[0]
    assert verdicts.names[0] == "1" and not first.kept and first.adapted_nll > first.source_nll
    torch.testing.assert_close(network[1].running_mean, source["1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(network[1].running_var, source["1.running_var"], rtol=0, atol=0)
    # Shots that agree on the same shift: kept.
    agreeing = torch.randn(3, 3, 8, 8, generator=generator) * 0.1 + 8.0
    verdicts = batchnorm_recalibration(network, [("1", network[1])], agreeing, RecalibrationSpec(prior_count=2))
    assert verdicts.verdicts[0].kept and not torch.equal(network[1].running_mean, source["1.running_mean"])


def test_batchnorm_recalibration_needs_a_batchnorm_trained_on_the_source():
    with pytest.raises(ValueError, match="has none \\(every BatchNorm is frozen\\)"):
        batchnorm_recalibration(two_batchnorm_network(), [], torch.rand(2, 3, 8, 8), RecalibrationSpec())


def densehybrid_trained_end_to_end() -> DenseHybridAD:
    module = DenseHybridAD(freeze="none", paste_shape="rectangle", decoder_channels=16,
                           negatives={"segmentation": "slic", "size": 24, "patch_size": 16},
                           target_recalibration={"prior_count": 2})
    return module.eval()


def test_densehybrid_recalibration_reads_only_the_shots_images_and_starts_from_the_source_each_time():
    module = densehybrid_trained_end_to_end()
    layers = trained_batch_norms(module.model)
    assert {"logits_head.bn", "outlier_head.bn"} <= {name for name, _ in layers} and len(layers) > 40
    source = copy_of_statistics(module.model)
    shots = ShotsOnly(torch.rand(2, 3, 32, 32) * 0.3 + 0.7)  # brighter: a shifted line
    module.prepare_scoring(shots)
    first = copy_of_statistics(module.model)
    assert any(not torch.equal(first[key], source[key]) for key in source)
    module.prepare_scoring(shots)  # from the source statistics again, not from the first update
    assert all(torch.equal(copy_of_statistics(module.model)[key], first[key]) for key in first)
    module.target_recalibration = None
    module.prepare_scoring(shots)  # without the option the checkpoint's statistics are back
    assert all(torch.equal(copy_of_statistics(module.model)[key], source[key]) for key in source)
    with pytest.raises(ValueError, match="align_channels moves PaDiM's per-position Gaussians"):
        DenseHybridAD(target_recalibration={"align_channels": "auto"})


def test_batchnorm_recalibration_estimates_large_maps_from_evenly_spaced_positions(monkeypatch):
    monkeypatch.setattr(target_recalibration, "BATCHNORM_POSITIONS", 16)
    network = two_batchnorm_network()
    images = torch.rand(2, 3, 8, 8) + 0.5
    spec = RecalibrationSpec(prior_count=2, views="flips", safety=False)
    reference = two_batchnorm_network()
    batchnorm_recalibration(network, [("1", network[1])], images, spec)
    subset = torch.linspace(0, 63, 16).round().long()
    first_input = network[0](label_preserving_views(images, "flips")).flatten(2)[:, :, subset]
    # the prior counts prior_count images of the 16 positions the estimate reads
    mean, var = shrunk_channel_moments(first_input[..., None], reference[1], spec.prior_count)
    torch.testing.assert_close(network[1].running_mean, mean.float())
    torch.testing.assert_close(network[1].running_var, var.float())


def test_batchnorm_recalibration_names_the_layer_whose_input_is_not_finite_and_changes_nothing():
    network = two_batchnorm_network()
    with torch.no_grad():
        network[3].weight[0, 0, 0, 0] = float("inf")
    source = copy_of_statistics(network)
    with pytest.raises(FloatingPointError, match="input to BatchNorm '4' is not finite"):
        batchnorm_recalibration(network, [("1", network[1]), ("4", network[4])], torch.rand(2, 3, 8, 8) - 0.5,
                                RecalibrationSpec(prior_count=2, safety=False))
    # the layer before it had been updated: put back too
    assert all(torch.equal(copy_of_statistics(network)[key], value) for key, value in source.items())


def test_anchored_statistics_normalise_the_target_as_the_layer_normalised_the_source():
    layer = torch.nn.BatchNorm2d(4, eps=1e-12).eval()
    generator = torch.Generator().manual_seed(0)
    layer.running_mean.uniform_(-1, 1, generator=generator)
    layer.running_var.uniform_(0.5, 2, generator=generator)
    source = torch.randn(6, 4, 5, 5, generator=generator, dtype=torch.float64) * 0.5 + 2
    target = torch.randn(6, 4, 5, 5, generator=generator, dtype=torch.float64) * 3 - 1

    def moments(x):
        return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)

    def normalised(x, mean, var):
        return (x - mean[None, :, None, None]) / (var[None, :, None, None] + layer.eps).sqrt()

    mean, var = anchored_statistics(layer, moments(source), moments(target))
    running = (layer.running_mean.double(), layer.running_var.double())
    for got, expected in zip(moments(normalised(target, mean, var)), moments(normalised(source, *running)), strict=True):
        torch.testing.assert_close(got, expected)
    # anchored to the layer's own statistics (learned on the source): plain AdaBN
    for got, expected in zip(anchored_statistics(layer, running, moments(target)), moments(target), strict=True):
        torch.testing.assert_close(got, expected)


def test_input_moments_are_each_layers_exact_input_moments_over_every_batch():
    network = two_batchnorm_network()
    batches = [torch.rand(3, 3, 8, 8), torch.rand(2, 3, 8, 8) * 2]
    moments = input_moments(network, [("1", network[1]), ("4", network[4])], batches)
    inputs = network[0](torch.cat(batches))
    torch.testing.assert_close(moments["1"][0], inputs.double().mean((0, 2, 3)))
    torch.testing.assert_close(moments["1"][1], inputs.double().var((0, 2, 3)))
    assert set(moments) == {"1", "4"} and not network[1]._forward_pre_hooks  # hooks removed


def test_batchnorm_recalibration_anchored_to_the_source_inputs_of_frozen_layers():
    network = two_batchnorm_network()
    reference = two_batchnorm_network()
    layers = [("1", network[1]), ("4", network[4])]
    source_images, images = torch.rand(4, 3, 8, 8), torch.rand(2, 3, 8, 8) * 0.5 + 0.8
    source = input_moments(network, layers, [source_images])
    spec = RecalibrationSpec(prior_count=2, views="flips", safety=False)
    batchnorm_recalibration(network, layers, images, spec, source)
    first_input = network[0](label_preserving_views(images, "flips"))
    target = shrunk_channel_moments(first_input, reference[1], spec.prior_count, source["1"])
    mean, var = anchored_statistics(reference[1], source["1"], target)
    torch.testing.assert_close(network[1].running_mean, mean.float())
    torch.testing.assert_close(network[1].running_var, var.float())
    # the second layer: its input through the first layer's new statistics, anchored to its own source input
    second_input = network[3](network[2](network[1](first_input)))
    target = shrunk_channel_moments(second_input, reference[4], spec.prior_count, source["4"])
    mean, var = anchored_statistics(reference[4], source["4"], target)
    torch.testing.assert_close(network[4].running_mean, mean.float())
    torch.testing.assert_close(network[4].running_var, var.float())


class GuardedTraining(ShotsOnly):
    """Target shots and training images, both read through items that raise on any key but ``image``."""

    def __init__(self, images: torch.Tensor, training: torch.Tensor) -> None:
        super().__init__(images)
        self.train_dataset = LabelGuardedShots(training)

    def val_dataloader(self) -> list:
        return []


def tiny_csflow(**recalibration) -> CSFlow:
    torch.manual_seed(0)
    return CSFlow(image_size=64, hidden_channels=8, kernel_sizes=[3],
                  target_recalibration={"prior_count": 2, "extractor_statistics": True, **recalibration}).eval()


def test_csflow_extractor_recalibration_reads_only_images_and_leaves_the_extractor_its_own_statistics(monkeypatch):
    monkeypatch.setattr(csflow_lightning_model, "separation", lambda *_: 0.5)  # no worse: kept
    module = tiny_csflow()
    own = copy_of_statistics(module.model.extractor)
    keys = set(module.state_dict())
    images = torch.rand(3, 64, 64, 3).permute(0, 3, 1, 2) * 0.3 + 0.7  # brighter: a shifted line
    data = GuardedTraining(images, torch.rand(6, 3, 64, 64))
    source_scores = module.anomaly_scores(images)[0]
    module.prepare_scoring(data)
    assert copy_of_statistics(module.model.extractor).keys() == own.keys()
    assert all(torch.equal(copy_of_statistics(module.model.extractor)[key], own[key]) for key in own)
    assert set(module.state_dict()) == keys  # the scale statistics are per run, not in a checkpoint
    assert module.model.use_scale_statistics
    assert not torch.allclose(module.anomaly_scores(images)[0], source_scores)
    statistics = module.model.scale_statistics[0].as_buffers()
    assert any(not torch.equal(statistics[key], own[key]) for key in own if "running" in key)
    module.target_recalibration = None
    module.prepare_scoring(data)  # without the option the extractor's own statistics score again
    assert not module.model.use_scale_statistics
    torch.testing.assert_close(module.anomaly_scores(images)[0], source_scores)


def test_csflow_extractor_recalibration_is_declined_when_the_pseudo_defect_separation_drops(monkeypatch):
    separations = iter([0.55, 0.60])  # with the update, then without it
    monkeypatch.setattr(csflow_lightning_model, "separation", lambda *_: next(separations))
    module = tiny_csflow()
    kept = module.recalibrate_to_target(GuardedTraining(torch.rand(2, 3, 64, 64), torch.rand(4, 3, 64, 64)))
    # declined: the flow-output standardisation is the fallback, under its own rule
    assert not module.model.use_scale_statistics and kept == (module.model.z_mean_0 is not None)
    separations = iter([0.60, 0.60])  # as good as before: kept, and no standardisation on top
    module.prepare_scoring(GuardedTraining(torch.rand(2, 3, 64, 64), torch.rand(4, 3, 64, 64)))
    assert module.model.use_scale_statistics and module.model.z_mean_0 is None


def test_csflow_extractor_recalibration_is_not_tried_on_one_shot_under_the_safety_rule(monkeypatch):
    def no_separation(*_):
        raise AssertionError("one shot: the extractor update was tried")

    monkeypatch.setattr(csflow_lightning_model, "separation", no_separation)
    module = tiny_csflow()
    kept = module.recalibrate_to_target(GuardedTraining(torch.rand(1, 3, 64, 64), torch.rand(4, 3, 64, 64)))
    assert not module.model.use_scale_statistics and kept == (module.model.z_mean_0 is not None)
    monkeypatch.setattr(csflow_lightning_model, "separation", lambda *_: 0.5)
    module.target_recalibration = RecalibrationSpec(prior_count=2, extractor_statistics=True, safety=False)
    module.prepare_scoring(GuardedTraining(torch.rand(1, 3, 64, 64), torch.rand(4, 3, 64, 64)))
    assert module.model.use_scale_statistics  # the rule off: applied whatever k


def test_csflow_extractor_recalibration_errors_name_what_is_missing_and_change_nothing():
    module = tiny_csflow()
    own = copy_of_statistics(module.model.extractor)
    with pytest.raises(ValueError, match="extractor_statistics needs the images the detector was fitted on"):
        module.recalibrate_to_target(ShotsOnly(torch.rand(2, 3, 64, 64)))
    shots = torch.rand(2, 3, 64, 64)
    shots[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="is not finite"):
        module.recalibrate_to_target(GuardedTraining(shots, torch.rand(4, 3, 64, 64)))
    assert not module.model.use_scale_statistics
    assert all(torch.equal(copy_of_statistics(module.model.extractor)[key], own[key]) for key in own)
    with pytest.raises(ValueError, match="phase 2 fits on the target shots"):
        CSFlowAdaptation.recalibrate_extractor(module, None, shots)
    with pytest.raises(ValueError, match="extractor_statistics is CS-Flow's"):
        Padim(num_features=8, target_recalibration={"extractor_statistics": True})
    with pytest.raises(ValueError, match="extractor_statistics is CS-Flow's"):
        DenseHybridAD(target_recalibration={"extractor_statistics": True})
    with pytest.raises(ValueError, match="extractor_statistics must be true or false"):
        RecalibrationSpec(extractor_statistics="yes")


def test_csflow_extractor_recalibration_refuses_other_training_images_than_the_fit():
    fitted = {"train_on": "source", "source": {"dataset": "surfaces", "category": "brick", "shift": None},
              "target": {"dataset": "surfaces_line_b", "category": "brick", "shift": None}, "target_shots": None}
    # a new target does not change a source fit's train split; another source or train_on does
    assert train_split_mismatch(fitted, {**fitted, "target": {"dataset": "folder", "root": "/data/lineC"}}) == []
    assert list(map(str, train_split_mismatch(fitted, {**fitted, "train_on": "target"}))) == [
        "train_on: 'source' -> 'target'"]
    assert list(map(str, train_split_mismatch(
        {**fitted, "train_on": "source+target_shots", "target_shots": 5, "fold": 0},
        {**fitted, "train_on": "source+target_shots", "target_shots": 5, "fold": 1}))) == ["fold: 0 -> 1"]
    # a domain is compared field by field, with the spellings of the same images equal
    same = {**fitted, "source": {**fitted["source"], "category": ["brick"], "shift": "none"}}
    assert train_split_mismatch(fitted, same) == []
    shots_fit = {**fitted, "train_on": "target_shots", "target_shots": 5, "fold": 0}
    inherited = {**shots_fit, "target": {**fitted["target"], "category": None}}  # the source's category
    assert train_split_mismatch(shots_fit, inherited) == []
    wood = {**inherited, "source": {**fitted["source"], "category": "wood"}}  # the target inherits it
    assert list(map(str, train_split_mismatch(shots_fit, wood))) == ["target.category: 'brick' -> 'wood'"]
    with pytest.raises(ValueError, match=r"the checkpoint's fit data.init_args: source.shift: unknown shift 'sepia'"):
        train_split_mismatch({**fitted, "source": {**fitted["source"], "shift": "sepia"}}, fitted)
    assert list(map(str, train_split_mismatch(fitted, {**fitted, "source": {**fitted["source"], "category": "wood"}}))) == [
        "source.category: 'brick' -> 'wood'"]
    module = tiny_csflow()
    module.fitted_data = fitted
    data = GuardedTraining(torch.rand(2, 3, 64, 64), torch.rand(4, 3, 64, 64))
    data.hparams = {**fitted, "source": {**fitted["source"], "shift": "gray"}}
    own = copy_of_statistics(module.model.extractor)
    with pytest.raises(ValueError, match=r"other training images than the checkpoint's fit \(data.init_args "
                                         r"source.shift: None -> 'gray'\)"):
        module.recalibrate_to_target(data)
    assert not module.model.use_scale_statistics
    assert all(torch.equal(copy_of_statistics(module.model.extractor)[key], own[key]) for key in own)
    # the same images in another folder (a checkpoint moved to another machine): warned, not refused
    folder_fit = {**fitted, "source": {**fitted["source"], "dataset": "folder", "root": "/cluster/lineA"}}
    module.fitted_data = folder_fit
    data.hparams = {**folder_fit, "source": {**folder_fit["source"], "root": "/mnt/lineA"}}
    with pytest.warns(UserWarning, match=r"another folder .*source.root: '/cluster/lineA' -> '/mnt/lineA'"):
        assert module.recalibrate_to_target(data) in (True, False)


def test_scale_statistics_stay_out_of_the_state_dict_and_dann_keeps_its_keys():
    network = two_batchnorm_network()
    assert BatchNormStatistics(network, persistent=False).state_dict() == {}
    assert set(BatchNormStatistics(network).state_dict()) == {f"{kind}_{i}" for kind in ("mean", "var", "count")
                                                              for i in range(len(named_batch_norms(network)))}


def test_csflow_extractor_recalibration_through_cli(surfaces_root, surfaces_line_b_root, tmp_path):
    source_args = csflow_args(surfaces_root, tmp_path, {})
    fitted = main(["fit", *source_args, "--trainer.max_steps", "4"])
    checkpoint = Path(fitted.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    config = Path(__file__).resolve().parents[1] / "configs" / "csflow" / "target_recalibration_extractor.yaml"
    tested = main(["test", *source_args, *embedded_line_b(surfaces_line_b_root), *NO_SHIFT, "--config", str(config),
                   "--data.init_args.target_shots", "2", "--ckpt_path", str(checkpoint)])
    module = tested.model
    assert module.target_recalibration == RecalibrationSpec(prior_count=2, extractor_statistics=True)
    assert module.fitted_data["train_on"] == "source"  # what the source moments were checked against
    folder = Path(tested.trainer.default_root_dir)
    kept = list(logged(folder, "adapt/kept").values())
    extractor_kept = list(logged(folder, "adapt/extractor_kept").values())
    assert kept in ([0.0], [1.0]) and extractor_kept in ([0.0], [1.0]) and extractor_kept <= kept
    assert module.model.use_scale_statistics == (extractor_kept == [1.0])
    assert 0 < list(logged(folder, "adapt/layers_kept").values())[0] <= 1
    assert logged(folder, "adapt/pseudo_defect_auroc_adapted") and logged(folder, "adapt/pseudo_defect_auroc_source")
    assert {"test/target/image_auroc", "test/source/image_auroc"} <= results(folder).keys()
    stored = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert set(module.state_dict()) == set(stored)
    assert all(torch.equal(module.state_dict()[key].cpu(), value) for key, value in stored.items() if "running" in key)
