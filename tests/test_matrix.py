"""Scale and reliability, method by method: DDP equivalence, bf16, exact resume after preemption, the
non-finite guard, and what reaches W&B (offline). Each case is a tiny ``cli.py`` run (``tests/methods.py``).

Single-process runs happen in this process (``cli.main``); the 2-process DDP runs (gloo) in a subprocess,
as Lightning's launcher re-runs ``cli.py`` for its second rank.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cli import main
from lightning_modules.base import NonFiniteLossError
from tests.methods import CASES, Case, fit_args, last_checkpoint, logged, results, run_cli, run_dir, weights
from tests.wandb_offline import summary

IDS = [case.name for case in CASES]
#: the figure each method logs (besides the results table)
FIGURES = ("anomaly_maps", "tsne_start", "tsne_end", "gmm_reconstructions")


def callback(class_path: str, case: Case, **init_args) -> list[str]:
    """Appends a callback to the config's list (``+=``), with ``unit`` set for methods without optimizer steps."""
    init_args["unit"] = "batch" if case.loss_key is None else "step"
    return [f"--trainer.callbacks+={class_path}", *(f"--trainer.callbacks.{k}={v}" for k, v in init_args.items())]


@contextmanager
def one_thread():
    """As each DDP rank runs (OMP_NUM_THREADS=1): float results depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batches_trained(checkpoint: dict) -> int:
    return checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]


def checkpoint_tested(folder: Path) -> Path:
    recorded = json.loads((folder / "results.json").read_text())["checkpoint"]
    return Path(recorded) if recorded else folder / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------------------------------------ 1. DDP


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_two_process_ddp_matches_one_process(case, surfaces_root, context, tmp_path):
    single, double = tmp_path / "single", tmp_path / "ddp"
    # Same global batch; a statistics-only fit (PaDiM) has no batch effect, so it keeps the per-process batch
    # and its features are computed as on each rank.
    with one_thread():
        main(["fit", *fit_args(case, surfaces_root, single, context, processes=2 if case.loss_key is None else 1)])
    fitted = run_cli(["fit", *fit_args(case, surfaces_root, double, context, processes=2), "--trainer.strategy",
                      case.ddp_strategy, "--trainer.devices", "2", "--run.test_after_fit", "true",
                      "--run.wandb", "true"])
    assert fitted.returncode == 0, fitted.stderr[-4000:]
    ddp_dir = run_dir(double, case)

    # The same checkpoint tested by 1 process with the per-process batch: every metric within 1e-6, so no
    # test sample was dropped or counted twice by the padding sampler.
    with one_thread():
        main(["test", *fit_args(case, surfaces_root, double, context, processes=2), "--ckpt_path",
              str(checkpoint_tested(ddp_dir))])
    one, two = results(run_dir(double, case, version=1)), results(ddp_dir)
    assert one and one.keys() == two.keys()
    for name in one:
        assert abs(one[name] - two[name]) <= 1e-6, (name, one[name], two[name])

    # Fitting: the same global batch on 2 processes gives the statistics / loss curve of 1 process.
    if case.loss_key is None:
        fitted_one, fitted_two = weights(last_checkpoint(single, case)), weights(last_checkpoint(double, case))
        for name, value in fitted_one.items():
            if value.is_floating_point():  # float32 features of a 1-image batch differ in the last bits
                assert (fitted_two[name] - value).abs().max() <= 1e-6 * value.abs().max(), name
            else:
                assert torch.equal(fitted_two[name], value), name
    else:
        # (Steps in common: with drop_last, a padded 2-process epoch can hold one batch more.)
        curve_one, curve_two = logged(run_dir(single, case), case.loss_key), logged(ddp_dir, case.loss_key)
        common = sorted(curve_one.keys() & curve_two.keys())
        assert len(common) >= 2, (curve_one, curve_two)
        mean_one, mean_two = (sum(c[step] for step in common) / len(common) for c in (curve_one, curve_two))
        assert mean_two == pytest.approx(mean_one, rel=case.loss_rtol), (curve_one, curve_two)

    # Only rank 0 logs to W&B: one offline run, with the test metrics and the run's tags.
    tracked = summary(ddp_dir)
    assert set(two) <= tracked["history_keys"]
    assert case.method in tracked["tags"]


# ------------------------------------------------------------------------------ 2. bf16 and W&B per run


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_fit_and_test_stay_finite_and_reach_wandb(case, surfaces_root, context, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["fit", *fit_args(case, surfaces_root, tmp_path, context), "--trainer.precision", "bf16-mixed",
          "--run.test_after_fit", "true", "--run.wandb", "true"])
    folder = run_dir(tmp_path, case)
    metrics = results(folder)
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
    assert all(torch.isfinite(v).all() for v in weights(last_checkpoint(tmp_path, case)).values()
               if v.is_floating_point())
    train_key = case.loss_key or "train/images"
    losses = logged(folder, train_key)
    assert losses and all(math.isfinite(v) for v in losses.values())

    tracked = summary(folder)
    history = tracked["history_keys"]
    assert train_key in history and any(k.startswith("val/") for k in history) == case.validates, history
    assert set(metrics) <= history and any(k.startswith("results") for k in history)
    assert any(k.startswith(FIGURES) for k in history), history
    assert "cli" in tracked["config_keys"], tracked["config_keys"]  # the full resolved config
    assert {case.method, "seed:0"} <= set(tracked["tags"])
    assert tracked["name"] == f"{case.method}/{folder.parent.name}/version_0"


# ------------------------------------------------------------------------ 3 + 4. preemption, exact resume


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_preempted_fit_resumes_to_bitwise_the_same_weights(case, surfaces_root, context, tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    main(["fit", *fit_args(case, surfaces_root, straight, context)])
    signal_name = "SIGUSR1" if CASES.index(case) % 2 else "SIGTERM"
    with pytest.raises(SystemExit) as stopped:
        main(["fit", *fit_args(case, surfaces_root, preempted, context),
              *callback("tests.toy.SignalAtStep", case, step=case.preempt_at, signal_name=signal_name)])
    assert stopped.value.code == 143
    saved = torch.load(last_checkpoint(preempted, case), weights_only=True)
    final = torch.load(last_checkpoint(straight, case), weights_only=True)
    # what `cli.py test --ckpt_path` rebuilds the model from and checks the config against
    assert set(final.get("hyper_parameters") or {}) - {"_instantiator", "_class_path"}, "no hyperparameters saved"
    assert 0 < batches_trained(saved) < batches_trained(final)  # stopped mid-fit
    if case.name == "adda":  # stopped inside the adversarial phase, where M_s must stay frozen after the resume
        assert bool(saved["state_dict"]["model.target_encoder_ready"])

    main(["fit", *fit_args(case, surfaces_root, preempted, context), "--ckpt_path", "last"])
    resumed = torch.load(last_checkpoint(preempted, case), weights_only=True)
    assert resumed["global_step"] == final["global_step"]
    assert resumed["state_dict"].keys() == final["state_dict"].keys()
    differ = [k for k, v in final["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not differ, f"weights differ after resume: {differ[:8]}"
    if case.loss_key is not None:  # the steps after the resume saw the same batches and random draws
        assert logged(run_dir(preempted, case), case.loss_key) == logged(run_dir(straight, case), case.loss_key)


# ---------------------------------------------------------------------------------- 5. non-finite guard


@pytest.mark.parametrize("target", ["batch", "weights"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(case, target, surfaces_root, context,
                                                                       tmp_path):
    with pytest.raises(NonFiniteLossError) as stopped:
        main(["fit", *fit_args(case, surfaces_root, tmp_path, context), "--checkpoint.every_n_train_steps", "1",
              *callback("tests.toy.PoisonAtStep", case, step=case.preempt_at, target=target)])
    message = str(stopped.value)
    assert re.search(r"loss term '\w+' is (nan|non-finite) at global step \d+|not saving a checkpoint at global "
                     r"step \d+: non-finite values in", message), message
    checkpoint = last_checkpoint(tmp_path, case)
    if checkpoint.exists():  # the last good one: finite, from before the poisoned step
        state = torch.load(checkpoint, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
        assert state["global_step"] <= case.preempt_at


# -------------------------------------------------------------------------------------------- 6. bad input


BAD_ARGS = {
    "unknown method": (["--model", "NoSuchMethod"], "NoSuchMethod"),
    "unknown backbone": (["--model.init_args.backbone.name", "resnet_typo"], "resnet_typo"),
    "unknown shift": (["--data.init_args.target.shift", "sepia"], "sepia"),
    "config key typo": (["--model.init_args.bn_polcy", "joint"], "bn_polcy"),
}


@pytest.mark.parametrize("name", BAD_ARGS)
def test_bad_names_and_keys_are_clear_errors(name, surfaces_root, tmp_path, capsys):
    dann = CASES[0]
    extra, named = BAD_ARGS[name]
    with pytest.raises((SystemExit, ValueError, KeyError)) as failed:
        main(["fit", *fit_args(dann, surfaces_root, tmp_path, {}), *extra])
    shown = f"{failed.value} {capsys.readouterr().err}"
    assert named in shown, shown[-2000:]
    assert not (tmp_path / dann.method).exists() or not any((tmp_path / dann.method).rglob("*.ckpt"))
