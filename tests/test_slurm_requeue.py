"""The SLURM requeue cycle, on CPU: SIGUSR1 in the middle of a step, in a fake SLURM job, saves at the batch
boundary and runs ``scontrol requeue``; the same command again continues by itself and ends bitwise equal to
an uninterrupted run (every parameter and buffer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main
from tests.methods import CASES, REPO, Case, fit_args
from tests.test_matrix import callback

JOB = "4242"
# CS-Flow's safe phase 2: the requeued job must reach the same safety decision at its final step
REQUEUED = [case for case in CASES if case.name in ("dann", "padim", "csflow_adapt_safe")]


def fake_slurm_job(monkeypatch, tmp_path: Path, job: str, scontrol: bool = True) -> Path:
    """SLURM's variables for a one-task job and, on PATH, an ``scontrol`` that records its arguments and, as
    SLURM does on a requeue, sends SIGTERM to its caller. Returns the file of recorded calls."""
    calls = tmp_path / "scontrol_calls.txt"
    if scontrol:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        script = bin_dir / "scontrol"
        script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nkill -TERM $PPID\n')
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in {"SLURM_JOB_ID": job, "SLURM_JOB_NAME": "shiftad", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, value)
    return calls


def final_checkpoint(runs: Path, case: Case, job: str) -> dict:
    (path,) = (runs / case.method).glob(f"*/slurm_{job}/checkpoints/last.ckpt")
    return torch.load(path, weights_only=True, map_location="cpu")


@pytest.mark.parametrize("case", REQUEUED, ids=[case.name for case in REQUEUED])
def test_requeued_slurm_job_ends_bitwise_equal_to_an_uninterrupted_one(case, surfaces_root, context, tmp_path,
                                                                      monkeypatch):
    runs = tmp_path / "runs"
    fake_slurm_job(monkeypatch, tmp_path, "4141")
    main(["fit", *fit_args(case, surfaces_root, runs, context)])
    straight = final_checkpoint(runs, case, "4141")

    calls = fake_slurm_job(monkeypatch, tmp_path, JOB)
    # The same command for both launches: the signal callback fires in the first one only.
    command = ["fit", *fit_args(case, surfaces_root, runs, context),
               *callback("tests.toy.SignalAtStep", case, step=case.preempt_at, signal_name="SIGUSR1", mid_step="true",
                         sent_marker=str(tmp_path / "signal_sent"))]
    with pytest.raises(SystemExit) as stopped:
        main(command)
    assert stopped.value.code == 143
    assert calls.read_text().split() == ["requeue", JOB]
    assert not list((runs / case.method).glob(f"*/slurm_{JOB}/hpc_ckpt_*.ckpt")), "no save inside the handler"

    main(command)  # the requeued job
    requeued = final_checkpoint(runs, case, JOB)
    assert requeued["global_step"] == straight["global_step"]
    assert requeued["state_dict"].keys() == straight["state_dict"].keys()
    differ = [k for k, v in straight["state_dict"].items() if not torch.equal(v, requeued["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(straight['state_dict'])} tensors differ: {differ[:6]}"


def test_sigusr1_in_slurm_without_scontrol_saves_and_says_how_to_continue(tmp_path, monkeypatch):
    fake_slurm_job(monkeypatch, tmp_path, JOB, scontrol=False)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python only: no scontrol to be found
    args = ["fit", "--model", "tests.toy.ToyDetector", "--data", "tests.toy.ToyDataModule", "--trainer.accelerator",
            "cpu", "--trainer.enable_progress_bar", "false", "--run.wandb", "false", "--run.root", str(tmp_path / "runs"),
            "--trainer.max_steps", "12", "--trainer.callbacks+=tests.toy.SignalAtStep", "--trainer.callbacks.step=3",
            "--trainer.callbacks.signal_name=SIGUSR1"]
    result = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 143, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = tmp_path / "runs" / "toy" / "toy" / f"slurm_{JOB}" / "checkpoints" / "last.ckpt"
    assert f"Preempted at global step 3: saved {last}" in result.stderr
    assert "scontrol is not on PATH" in result.stderr and "--ckpt_path last" in result.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 3
