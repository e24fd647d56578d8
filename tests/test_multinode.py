"""Two nodes of one process each, on CPU (gloo): through torchrun's static rendezvous and through SLURM's
variables, and a 2-node fit that loses a node, resumed with ``--ckpt_path last``. The "nodes" are processes on
this machine; each is started as a cluster starts it, with its own node rank."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from cli import RUN_DIR_ENV, main
from tests.methods import CASES, REPO, fit_args, results, weights
from tests.test_matrix import callback, one_thread

DANN = next(case for case in CASES if case.name == "dann")
#: seconds a node may take; a rendezvous waiting for a node that never comes fails the test instead of hanging
NODE_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_node_args(root: Path, runs: Path) -> list[str]:
    """The DANN case at the 1-process run's global batch, split over 2 nodes x 1 process."""
    return [*fit_args(DANN, root, runs, {}, processes=2), "--config", str(REPO / "configs/trainer/ddp.yaml"),
            "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.sync_batchnorm", "false"]


def node_env(**extra: str) -> dict[str, str]:
    # Without this test process's run folder (an in-process ``main`` sets it): each node finds its own.
    env = {k: v for k, v in os.environ.items() if k != RUN_DIR_ENV}
    return {**env, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra}


def run_nodes(commands: list[list[str]], envs: list[dict[str, str]]) -> list[subprocess.CompletedProcess]:
    """Starts every node together and waits for all of them; a node still running after NODE_TIMEOUT is killed."""
    nodes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for command, env in zip(commands, envs, strict=True)]
    finished = []
    for command, node in zip(commands, nodes, strict=True):
        try:
            output, _ = node.communicate(timeout=NODE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, 9)
            output, _ = node.communicate()
        finished.append(subprocess.CompletedProcess(command, node.returncode, output))
    return finished


def torchrun_fit(args: list[str], run_id: str) -> list[subprocess.CompletedProcess]:
    port = str(free_port())
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                 "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port, "--rdzv-id", run_id,
                 "cli.py", "fit", *node_args] for rank, node_args in enumerate(args_per_node(args))]
    return run_nodes(commands, [node_env()] * 2)


def slurm_fit(args: list[str], job: str) -> list[subprocess.CompletedProcess]:
    """The two tasks of ``srun --nodes 2 --ntasks-per-node 1``, as SLURM describes them to each."""
    port = str(free_port())
    envs = [node_env(SLURM_JOB_ID=job, SLURM_JOB_NAME="shiftad", SLURM_NTASKS="2", SLURM_NNODES="2",
                     SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(rank), SLURM_NODEID=str(rank), SLURM_LOCALID="0",
                     SLURM_NODELIST="localhost", MASTER_PORT=port) for rank in range(2)]
    return run_nodes([[sys.executable, "cli.py", "fit", *node_args] for node_args in args_per_node(args)], envs)


def args_per_node(args: list[str] | tuple[list[str], list[str]]) -> tuple[list[str], list[str]]:
    return args if isinstance(args, tuple) else (args, args)


def assert_ran(nodes: list[subprocess.CompletedProcess]) -> None:
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}: rc {node.returncode}\n{node.stdout[-3000:]}"


def test_two_nodes_through_torchrun_and_slurm_match_one_process(surfaces_root, tmp_path):
    by_torchrun, by_slurm = tmp_path / "torchrun", tmp_path / "slurm"
    assert_ran(torchrun_fit([*two_node_args(surfaces_root, by_torchrun), "--run.test_after_fit", "true"], "mn1"))
    assert_ran(slurm_fit([*two_node_args(surfaces_root, by_slurm), "--run.test_after_fit", "true"], "4242"))

    # One run folder per launch, shared by both nodes.
    (torchrun_dir,) = (by_torchrun / DANN.method).glob("*/*")
    (slurm_dir,) = (by_slurm / DANN.method).glob("*/*")
    assert (torchrun_dir.name, slurm_dir.name) == ("torchrun_mn1", "slurm_4242")

    # Both launchers give the same fit, and its test metrics are those of 1 process testing the checkpoint with
    # the per-process batch (no test sample dropped or counted twice by the padding sampler).
    fitted = weights(torchrun_dir / "checkpoints" / "last.ckpt")
    assert all(torch.equal(v, weights(slurm_dir / "checkpoints" / "last.ckpt")[k]) for k, v in fitted.items())
    with one_thread():
        main(["test", *fit_args(DANN, surfaces_root, by_torchrun, {}, processes=2), "--ckpt_path",
              str(torchrun_dir / "checkpoints" / "last.ckpt"), "--run.version", "one_process"])
    one = results(torchrun_dir.parent / "one_process")
    for two in (results(torchrun_dir), results(slurm_dir)):
        assert one and one.keys() == two.keys()
        for name in one:
            assert abs(one[name] - two[name]) <= 1e-6, (name, one[name], two[name])


def test_two_node_fit_that_loses_a_node_resumes_to_the_same_weights(surfaces_root, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # last.ckpt after every step (with a monitored validation metric, Lightning saves it with top-k only)
    every_step = ["--checkpoint.monitor", "null", "--checkpoint.every_n_train_steps", "1"]
    assert_ran(torchrun_fit([*two_node_args(surfaces_root, straight), *every_step], "whole"))

    # Node 1 dies (SIGKILL: no save, no goodbye) at the end of step 2; node 0 finds out at its next collective.
    args = [*two_node_args(surfaces_root, killed), *every_step]
    lost = torchrun_fit((args, [*args, *callback("tests.toy.SignalAtStep", DANN, step=2, signal_name="SIGKILL")]),
                        "lost")
    assert all(node.returncode != 0 for node in lost), [node.returncode for node in lost]
    (folder,) = (killed / DANN.method).glob("*/torchrun_lost")
    saved = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < saved["global_step"] < DANN.steps

    assert_ran(torchrun_fit([*args, "--ckpt_path", "last"], "lost"))
    with (folder / "metrics.csv").open() as attempt:  # this attempt's log: it went on from the checkpoint
        assert min(int(row["step"]) for row in csv.DictReader(attempt)) >= saved["global_step"]
    resumed = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    final = torch.load(next((straight / DANN.method).glob("*/torchrun_whole/checkpoints/last.ckpt")),
                       weights_only=True)
    assert resumed["global_step"] == final["global_step"] == DANN.steps
    differ = [k for k, v in final["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(final['state_dict'])} tensors differ: {differ[:6]}"
