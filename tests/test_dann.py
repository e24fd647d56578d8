import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from cli import main
from datamodules import Domain, PairedDomainDataModule
from lightning_modules.adda import ADDA
from lightning_modules.components.batchnorm_statistics import batch_norms
from lightning_modules.components.discriminator import DomainDiscriminator, domain_loss
from lightning_modules.components.gradient_reversal import (
    GradientReversal,
    reversal_coefficient,
    reverse_gradient,
)
from lightning_modules.components.inverse_decay_lr import InverseDecayLR
from lightning_modules.dann import DANN
from tests.methods import logged

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--run.wandb", "false"]


def cli_args(surfaces_root, run_root, mode="dann", category="grass", epochs=1, extra=()):
    return ["--config", str(REPO / f"configs/dann/surfaces_{mode}.yaml"),
            "--data.init_args.source.root", str(surfaces_root),
            "--data.init_args.source.category", category, "--data.init_args.image_size", "32",
            "--data.init_args.batch_size", "4", "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu",
            "--trainer.log_every_n_steps", "1", "--run.root", str(run_root), *QUIET, *extra]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})


def test_gradient_reversal_flips_and_scales_the_gradient_by_exactly_minus_lambda():
    inputs = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 7, dtype=torch.float64)
    for lam in (0.0, 0.37, 1.0, 2.5):
        inputs.grad = None
        outputs = GradientReversal(lam)(inputs)
        assert torch.equal(outputs, inputs)
        outputs.backward(upstream)
        assert torch.equal(inputs.grad, -lam * upstream)
    assert reverse_gradient(inputs, 1.0).grad_fn is not None


def test_reversal_schedule_starts_at_zero_and_approaches_one():
    assert reversal_coefficient(0.0) == 0.0
    assert reversal_coefficient(0.5) == pytest.approx(2 / (1 + torch.exp(torch.tensor(-5.0)).item()) - 1)
    assert 0.9999 < reversal_coefficient(1.0) < 1.0 and reversal_coefficient(3.0) == reversal_coefficient(1.0)
    values = [reversal_coefficient(p / 10) for p in range(11)]
    assert values == sorted(values)


def test_discriminator_outputs_one_logit_and_rejects_bad_width():
    discriminator = DomainDiscriminator(16, hidden=32)
    assert discriminator(torch.randn(6, 16)).shape == (6,)
    with pytest.raises(ValueError, match="in_features"):
        DomainDiscriminator(0)
    # Confident and right costs little; confident and wrong costs a lot.
    assert domain_loss(torch.full((4,), 9.0), torch.full((4,), -9.0)) < 1e-3 < domain_loss(torch.zeros(4), torch.zeros(4))


def test_inverse_decay_schedule_follows_the_formula():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = InverseDecayLR(optimizer, gamma=0.001, decay=0.75)
    for _ in range(100):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 + 0.001 * 100) ** -0.75)


def tiny_module(mode="dann", **kwargs) -> DANN:
    return DANN(mode=mode, trainable=["blocks.6"], bottleneck_dim=8, discriminator_hidden=16, **kwargs)


def tiny_adda(**kwargs) -> ADDA:
    return ADDA(trainable=["blocks.6"], bottleneck_dim=8, discriminator_hidden=16, pretrain_epochs=1, **kwargs)


def tiny_trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_discriminator_sees_both_domains_in_one_pass():
    module = tiny_module()
    module.reversal_lambda = lambda: 0.5  # no trainer here
    seen = []
    module.model.discriminator.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach()))
    source, target = torch.rand(3, 3, 32, 32), torch.rand(2, 3, 32, 32)
    module.train()
    loss = module._dann_step(source, torch.tensor([0, 1, 0]), target)
    assert len(seen) == 1 and seen[0].shape == (5, 8)
    source_features, target_features = module.model.paired_features(source, target)
    assert torch.allclose(seen[0][:3], source_features, atol=1e-6)
    assert torch.allclose(seen[0][3:], target_features, atol=1e-6)
    loss.backward()
    assert module.model.encoder.bottleneck[0].weight.grad.abs().sum() > 0


def test_per_domain_batchnorm_keeps_separate_target_statistics():
    model = tiny_module(bn_policy="per_domain").model.train()
    layers = batch_norms(model.encoder)
    bottleneck_bn = model.encoder.bottleneck[1]
    index = layers.index(bottleneck_bn)
    target_mean = getattr(model.target_statistics, f"mean_{index}")
    source_before, target_before = bottleneck_bn.running_mean.clone(), target_mean.clone()
    source_features, target_features = model.paired_features(torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32) * 0.2)
    (source_features.sum() + target_features.sum()).backward()  # the swaps must not break autograd
    assert not torch.equal(bottleneck_bn.running_mean, source_before)
    assert not torch.equal(target_mean, target_before)
    assert not torch.allclose(bottleneck_bn.running_mean, target_mean)


def test_adabn_estimates_target_statistics_from_target_images():
    module = tiny_module(mode="adabn")
    model = module.model.eval()
    images = [torch.rand(4, 3, 32, 32) * 0.3 for _ in range(2)]
    source_logits = model(images[0], "source")
    model.estimate_target_statistics(images)
    assert not model.training
    assert torch.equal(model(images[0], "source"), source_logits)  # source statistics untouched
    assert not torch.allclose(model(images[0], "target"), source_logits)
    # A frozen stage keeps its pretrained statistics for both domains.
    layers = batch_norms(model.encoder)
    frozen = next(i for i, layer in enumerate(layers) if not any(p.requires_grad for p in layer.parameters()))
    assert torch.equal(getattr(model.target_statistics, f"mean_{frozen}"), layers[frozen].running_mean)


def test_adabn_statistics_are_the_exact_moments_of_each_layers_input_over_all_target_images():
    # Batches of unequal size and content: averaging per-batch variances would miss the variance between them,
    # and batch statistics in the earlier layers would not be what evaluation feeds the later ones.
    model = tiny_module(mode="adabn").model.eval()
    torch.manual_seed(0)
    batches = [torch.rand(5, 3, 32, 32) * 0.2, torch.rand(3, 3, 32, 32) * 0.5 + 0.5, torch.rand(2, 3, 32, 32)]
    model.estimate_target_statistics(batches)
    names = dict(model.encoder.named_modules())
    estimated = [n for n in model.target_statistics.layer_names
                 if any(p.requires_grad for p in names[n].parameters())]
    assert len(estimated) > 3
    inputs = {}
    handles = [names[n].register_forward_pre_hook(lambda _m, args, n=n: inputs.__setitem__(n, args[0].double()))
               for n in estimated]
    model.features(torch.cat(batches), "target")  # eval: every layer normalises with the stored target statistics
    for handle in handles:
        handle.remove()
    for name in estimated:
        index = model.target_statistics.layer_names.index(name)
        values = inputs[name].transpose(0, 1).reshape(inputs[name].shape[1], -1)
        mean, var = values.mean(dim=1), values.var(dim=1, unbiased=True)
        stored_mean = getattr(model.target_statistics, f"mean_{index}").double()
        stored_var = getattr(model.target_statistics, f"var_{index}").double()
        assert torch.allclose(stored_mean, mean, rtol=1e-4, atol=1e-5), name
        assert torch.allclose(stored_var, var, rtol=1e-4, atol=1e-6), name


def target_statistics_of(module: DANN) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.model.target_statistics.state_dict().items()}


def test_exact_target_statistics_replace_dann_running_averages_at_test_but_not_at_validation(surfaces_root, tmp_path):
    data = PairedDomainDataModule(source=Domain(dataset="surfaces", root=str(surfaces_root), category="grass",
                                                shift="gray"), image_size=32, batch_size=4, target_val=True)
    module = tiny_module(bn_policy="per_domain", exact_target_statistics=True)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=data)
    running = target_statistics_of(module)
    trainer.validate(module, datamodule=data)  # in training the target statistics are still dann's own
    assert all(torch.equal(running[name], value) for name, value in target_statistics_of(module).items())
    plain = tiny_module(bn_policy="per_domain")
    plain.load_state_dict(module.state_dict())
    trainer.test(plain, datamodule=data)
    assert all(torch.equal(running[name], value) for name, value in target_statistics_of(plain).items())

    expected = tiny_module(bn_policy="per_domain")
    expected.load_state_dict(module.state_dict())
    expected.model.estimate_target_statistics(batch["image"] for batch in data.target_statistics_dataloader())
    trainer.test(module, datamodule=data)
    exact = target_statistics_of(module)
    assert any(not torch.equal(running[name], exact[name]) for name in exact)
    assert all(torch.equal(value, exact[name]) for name, value in target_statistics_of(expected).items())


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        DANN(mode="dan")
    with pytest.raises(ValueError, match="bn_policy must be one of"):
        DANN(bn_policy="shared")
    with pytest.raises(ValueError, match="bn_policy='frozen'"):
        DANN(mode="adabn", bn_policy="frozen")
    with pytest.raises(ValueError, match="lightning_modules.adda.ADDA"):
        DANN(mode="adda")
    for mode, bn_policy in (("source_only", "joint"), ("adabn", "joint"), ("dann", "frozen")):
        with pytest.raises(ValueError, match=f"exact_target_statistics .* got mode '{mode}', bn_policy '{bn_policy}'"):
            DANN(mode=mode, bn_policy=bn_policy, exact_target_statistics=True)
    with pytest.raises(ValueError, match="pretrain_epochs"):
        ADDA(pretrain_epochs=0)


class SnapshotSourceAtAdversarialStart(Callback):
    """Copies the source encoder and head when ADDA's adversarial phase has begun (first batch of epoch 1)."""

    def __init__(self) -> None:
        self.source = self.target = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and self.source is None:
            model = pl_module.model
            self.source = {k: v.clone() for m in ("encoder", "head") for k, v in
                           getattr(model, m).state_dict(prefix=f"{m}.").items()}
            self.target = {k: v.clone() for k, v in model.target_encoder.state_dict().items()}


def test_adda_leaves_the_source_encoder_and_head_bitwise_unchanged(surfaces_root, tmp_path):
    module = tiny_adda()
    data = PairedDomainDataModule(source=Domain(dataset="surfaces", root=str(surfaces_root), category="grass",
                                                shift="gray"), image_size=32, batch_size=4)
    snapshot = SnapshotSourceAtAdversarialStart()
    tiny_trainer(tmp_path, max_epochs=3, callbacks=[snapshot]).fit(module, datamodule=data)
    model = module.model
    assert snapshot.source is not None and bool(model.target_encoder_ready)
    after = {k: v for m in ("encoder", "head") for k, v in getattr(model, m).state_dict(prefix=f"{m}.").items()}
    assert after.keys() == snapshot.source.keys()
    assert all(torch.equal(after[k], snapshot.source[k]) for k in after)
    assert not any(p.requires_grad for m in (model.encoder, model.head) for p in m.parameters())
    moved = [k for k, v in model.target_encoder.state_dict().items() if not torch.equal(v, snapshot.target[k])]
    assert moved, "the target encoder must be trained in the adversarial phase"


def test_adda_discriminator_sees_both_domains_in_every_pass(surfaces_root, tmp_path):
    module = tiny_adda()
    data = PairedDomainDataModule(source=Domain(dataset="surfaces", root=str(surfaces_root), category="grass",
                                                shift="gray"), image_size=32, batch_size=4)
    seen = []
    module.model.discriminator.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach().clone()))
    tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0).fit(module, datamodule=data)
    # 2 adversarial batches, each a D step and an M_t step, each one pass over 4 source + 4 target features
    assert [features.shape[0] for features in seen] == [8, 8, 8, 8]
    for d_step, target_step in zip(seen[::2], seen[1::2], strict=True):
        assert torch.equal(d_step[:4], target_step[:4])  # the frozen M_s(x_s) in both passes
        assert not torch.allclose(d_step[:4], d_step[4:])  # and M_t(x_t) beside it


def test_two_categories_fit_and_test_through_the_cli(surfaces_root, tmp_path):
    for category in ("grass", "woven"):
        main(["fit", *cli_args(surfaces_root, tmp_path, category=category, epochs=2), "--run.test_after_fit", "true"])
        run_dir = tmp_path / "dann" / f"surfaces-{category}-gray-to-none-da" / "version_0"
        metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
        assert {"test/target/accuracy", "test/source/accuracy"} <= metrics.keys()
        assert all(0.0 <= metrics[k] <= 1.0 for k in metrics)
        assert (run_dir / "tsne_start.png").is_file() and (run_dir / "tsne_end.png").is_file()
        lambdas = logged(run_dir, "train/grl_lambda")
        assert lambdas and lambdas == {s: pytest.approx(reversal_coefficient(s / 6)) for s in lambdas}
        assert logged(run_dir, "train/discriminator_accuracy")
    main(["test", *cli_args(surfaces_root, tmp_path, category="woven"), "--ckpt_path", "last"])
    assert (tmp_path / "dann" / "surfaces-woven-gray-to-none-da" / "version_1" / "results.json").is_file()


@pytest.mark.parametrize("mode", ["source_only", "adabn"])  # dann and adda: tests/test_matrix.py
def test_other_modes_fit_and_test_in_bf16_mixed(surfaces_root, tmp_path, mode):
    extra = ["--trainer.precision", "bf16-mixed", "--run.test_after_fit", "true"]
    main(["fit", *cli_args(surfaces_root, tmp_path, mode=mode, epochs=2, extra=extra)])
    run_dir = tmp_path / mode / "surfaces-grass-gray-to-none-da" / "version_0"
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert 0.0 <= metrics["test/target/accuracy"] <= 1.0


def test_killed_fit_resumes_with_the_same_lambda_and_step(surfaces_root, tmp_path):
    # 3 batches per epoch, 4 epochs = 12 steps; killed after step 7 with a checkpoint every 3 steps.
    kill = tmp_path / "kill.yaml"
    kill.write_text("trainer:\n  callbacks:\n    - class_path: tests.toy.KillAtStep\n      init_args: {step: 7}\n"
                    "checkpoint:\n  every_n_train_steps: 3\n")
    args = ["fit", *cli_args(surfaces_root, tmp_path, epochs=4), "--checkpoint.every_n_train_steps", "3"]
    killed = run_cli([*args, "--config", str(kill)])
    assert killed.returncode == 3, killed.stderr[-3000:]
    run_dir = tmp_path / "dann" / "surfaces-grass-gray-to-none-da" / "version_0"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    resumed = run_cli([*args, "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    lambdas = logged(run_dir, "train/grl_lambda")
    assert {6, 11} <= lambdas.keys()  # steps logged after the resume
    assert all(value == pytest.approx(reversal_coefficient(step / 12)) for step, value in lambdas.items())


def test_target_label_selection_is_only_the_named_oracle(surfaces_root, tmp_path, caplog):
    oracle = ["--data.init_args.target_val", "true", "--checkpoint.monitor", "val/target_oracle_accuracy"]
    with pytest.raises(ValueError, match="selection: oracle"):
        main(["fit", *cli_args(surfaces_root, tmp_path, mode="source_only", extra=oracle)])
    with caplog.at_level(logging.WARNING):
        main(["fit", *cli_args(surfaces_root, tmp_path / "oracle", mode="source_only",
                               extra=[*oracle, "--model.init_args.selection", "oracle"])])
    assert "ORACLE model selection" in caplog.text
    run_dir = tmp_path / "oracle" / "source_only" / "surfaces-grass-gray-to-none-da-oracle" / "version_0"
    assert logged(run_dir, "val/target_oracle_accuracy") and logged(run_dir, "val/source_accuracy")
