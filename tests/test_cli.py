import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main
from tests.wandb_offline import summary

REPO = Path(__file__).resolve().parents[1]
TOY = ["--model", "tests.toy.ToyDetector", "--data", "tests.toy.ToyDataModule", "--trainer.accelerator", "cpu",
       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", **(env or {})},
    )


def test_help_lists_groups_methods_and_datamodules():
    result = run_cli(["fit", "--help"])
    assert result.returncode == 0, result.stderr
    for group in ("--model", "--data", "--trainer", "--checkpoint", "--run.root", "--run.wandb"):
        assert group in result.stdout
    assert "known subclasses" in result.stdout


def test_fit_killed_then_resumed_reaches_the_same_final_step(tmp_path):
    config = tmp_path / "kill.yaml"
    config.write_text(
        "trainer:\n  max_steps: 12\n  callbacks:\n    - class_path: tests.toy.KillAtStep\n      init_args: {step: 7}\n"
        "checkpoint:\n  every_n_train_steps: 3\n"
    )
    args = ["fit", *TOY, "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"]
    killed = run_cli([*args, "--config", str(config)])
    assert killed.returncode == 3, killed.stderr[-2000:]
    run_dir = tmp_path / "runs" / "toy" / "toy" / "version_0"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6

    resumed = run_cli([*args, "--trainer.max_steps", "12", "--checkpoint.every_n_train_steps", "3", "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "runs" / "toy" / "toy" / "version_1").exists(), "a resume must continue in place"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config.1.yaml").is_file()



def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = run_cli(["fit", *TOY, "--run.root", str(tmp_path), "--run.wandb", "false", "--ckpt_path", "last"])
    assert result.returncode != 0
    assert "--ckpt_path last: no run of 'toy'" in result.stderr


def test_runs_get_new_versioned_folders(tmp_path):
    for _ in range(2):
        main(["fit", *TOY, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--run.root", str(tmp_path),
              "--run.wandb", "false"])
    assert sorted(p.name for p in (tmp_path / "toy" / "toy").iterdir()) == ["version_0", "version_1"]
    # Continuing the newest run keeps the metrics it logged so far.
    main(["fit", *TOY, "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1", "--run.root", str(tmp_path),
          "--run.wandb", "false",
          "--ckpt_path", "last"])
    continued = tmp_path / "toy" / "toy" / "version_1"
    assert (continued / "metrics.1.csv").is_file() and (continued / "metrics.csv").is_file()


def test_wandb_offline_run_holds_metrics_config_and_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["fit", *TOY, "--trainer.max_steps", "10", "--trainer.log_every_n_steps", "1", "--run.root", str(tmp_path)])
    main(["test", *TOY, "--run.root", str(tmp_path), "--ckpt_path", "last"])
    test_dir = tmp_path / "toy" / "toy" / "version_1"
    results = json.loads((test_dir / "results.json").read_text())
    assert results["metrics"]["test/target/image_auroc"] > 0.9
    assert "| test/target/pixel_aupro |" in (test_dir / "results.md").read_text()
    assert "Results of toy" in capsys.readouterr().out
    assert (test_dir / "anomaly_maps.png").is_file() and (test_dir / "metrics.csv").is_file()

    fit_run = summary(tmp_path / "toy" / "toy" / "version_0")
    assert {"train/loss", "train/reconstruction", "val/loss"} <= fit_run["history_keys"]
    assert "cli" in fit_run["config_keys"]
    assert "toy" in fit_run["tags"] and fit_run["name"] == "toy/toy/version_0"
    test_run = summary(test_dir)
    assert {"test/target/image_auroc", "test/target/pixel_auroc", "test/target/pixel_aupro"} <= test_run["history_keys"]
    assert any(key.startswith("results") for key in test_run["history_keys"])
    assert any(key.startswith("anomaly_maps") for key in test_run["history_keys"])


def test_best_checkpoint_is_a_model_artifact_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    fit = ["fit", *TOY, "--trainer.max_epochs", "2", "--checkpoint.monitor", "val/loss", "--run.root", str(tmp_path)]
    main(fit)
    main([*fit, "--run.log_model", "true"])
    assert summary(tmp_path / "toy" / "toy" / "version_0")["artifacts"] == []
    artifacts = summary(tmp_path / "toy" / "toy" / "version_1")["artifacts"]
    assert artifacts and all(a["type"] == "model" for a in artifacts)
    assert any("best" in a["aliases"] for a in artifacts), artifacts


def test_wandb_never_prompts_without_login(tmp_path, monkeypatch):
    from callbacks.tracking import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_toy_fit_under_mixed_precision(tmp_path, precision):
    main(["fit", *TOY, "--trainer.max_steps", "2", "--trainer.precision", precision,
          "--run.root", str(tmp_path), "--run.wandb", "false"])


def test_fit_can_end_with_a_test_of_the_selected_checkpoint(tmp_path):
    main(["fit", *TOY, "--trainer.max_epochs", "2", "--checkpoint.monitor", "val/loss", "--run.test_after_fit", "true",
          "--run.root", str(tmp_path), "--run.wandb", "false"])
    results = json.loads((tmp_path / "toy" / "toy" / "version_0" / "results.json").read_text())
    assert results["global_step"] > 0 and "test/target/image_auroc" in results["metrics"]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_a_checkpoint_and_the_next_launch_continues(tmp_path, signal_name):
    config = tmp_path / "preempt.yaml"
    config.write_text(
        "trainer:\n  max_steps: 12\n  callbacks:\n    - class_path: tests.toy.SignalAtStep\n"
        f"      init_args: {{step: 5, signal_name: {signal_name}}}\n"
    )
    args = ["fit", *TOY, "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"]
    preempted = run_cli([*args, "--config", str(config)])
    assert preempted.returncode == 143, preempted.stderr[-2000:]
    assert "Preempted at global step 5" in preempted.stderr
    last = tmp_path / "runs" / "toy" / "toy" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    resumed = run_cli([*args, "--trainer.max_steps", "12", "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(last, weights_only=True)["global_step"] == 12


def test_bad_checkpoint_paths_are_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage")
    result = run_cli(["test", *TOY, "--run.root", str(tmp_path), "--run.wandb", "false", "--ckpt_path", str(corrupt)])
    assert result.returncode != 0 and "corrupt.ckpt: not a torch checkpoint" in result.stderr
    result = run_cli(["test", *TOY, "--run.root", str(tmp_path), "--run.wandb", "false",
                      "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert result.returncode != 0 and "missing.ckpt: no such checkpoint file" in result.stderr


def test_checkpoint_of_another_method_is_refused(tmp_path):
    main(["fit", *TOY, "--trainer.max_steps", "2", "--run.root", str(tmp_path), "--run.wandb", "false"])
    checkpoint = tmp_path / "toy" / "toy" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    state["shiftad_method"] = "DANN"
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="checkpoint holds method 'DANN'.*config's model is 'toy'"):
        main(["test", *TOY, "--run.root", str(tmp_path), "--run.wandb", "false", "--ckpt_path", str(checkpoint)])
