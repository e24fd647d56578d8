"""Run folders, checkpoint/config agreement and error messages of ``cli.py`` (issue 16, items 8, 10-12, 14, 15)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import cli
from cli import ConfigError, main
from tests.conftest import make_folder_tree
from tests.wandb_offline import summary

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
TOY = ["--model", "tests.toy.ToyDetector", "--data", "tests.toy.ToyDataModule", *QUIET]


def padim(root: Path, category: str = "brick") -> list[str]:
    return ["--config", str(REPO / "configs/padim/padim_surfaces.yaml"), *QUIET, "--run.wandb", "false",
            "--data.init_args.source.root", str(root), "--data.init_args.source.category", category,
            "--data.init_args.image_size", "32", "--data.init_args.resize_size", "null",
            "--model.init_args.num_features", "8"]


def dann(root: Path, mode: str) -> list[str]:
    return ["--config", str(REPO / f"configs/dann/surfaces_{mode}.yaml"), *QUIET, "--run.wandb", "false",
            "--data.init_args.source.root", str(root), "--data.init_args.source.category", "brick",
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4", "--trainer.callbacks", "[]"]


@pytest.fixture(scope="module")
def checkpoints(surfaces_root, tmp_path_factory) -> dict[str, Path]:
    """A tiny PaDiM and a tiny source_only DANN checkpoint, both trained on surfaces/brick."""
    runs = tmp_path_factory.mktemp("method_runs")
    main(["fit", *padim(surfaces_root), "--run.root", str(runs)])
    main(["fit", *dann(surfaces_root, "source_only"), "--trainer.max_steps", "1", "--run.root", str(runs)])
    return {name: next(runs.glob(f"{name}/*/version_0/checkpoints/last.ckpt")) for name in ("padim", "source_only")}


def test_two_launches_racing_for_a_version_get_their_own(tmp_path, monkeypatch):
    scan = cli._next_version

    def another_launch_claims_it_first(parent: Path) -> str:
        name = scan(parent)
        if name == "version_0":
            (parent / name).mkdir()  # the other launch, between our scan and our claim
        return name

    monkeypatch.setattr(cli, "_next_version", another_launch_claims_it_first)
    main(["fit", *TOY, "--trainer.max_steps", "1", "--run.root", str(tmp_path), "--run.wandb", "false"])
    runs = tmp_path / "toy" / "toy"
    assert list((runs / "version_0").iterdir()) == [], "the other launch's folder must stay untouched"
    assert (runs / "version_1" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("checkpoint_of, config", [("padim", "dann"), ("source_only", "padim")])
def test_a_checkpoint_of_another_method_stops_naming_both(checkpoints, surfaces_root, tmp_path, checkpoint_of, config):
    args = dann(surfaces_root, "dann") if config == "dann" else padim(surfaces_root)
    stored, configured = {"padim": ("'padim'", "'dann'"), "source_only": ("'dann'", "'padim'")}[checkpoint_of]
    with pytest.raises(ValueError, match=f"checkpoint holds method {stored}.*config's model is {configured}"):
        main(["test", *args, "--run.root", str(tmp_path), "--ckpt_path", str(checkpoints[checkpoint_of])])
    assert not any(tmp_path.iterdir()), "nothing may be written"


def test_a_legal_test_time_option_is_applied(checkpoints, surfaces_root, tmp_path):
    main(["test", *dann(surfaces_root, "source_only"), "--model.init_args.mode", "adabn", "--run.root", str(tmp_path),
          "--ckpt_path", str(checkpoints["source_only"])])
    (run_dir,) = tmp_path.glob("adabn/*/version_0")
    assert json.loads((run_dir / "results.json").read_text())["method"] == "adabn"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_args"]["mode"] == "adabn"


def test_other_model_options_at_test_time_are_refused_by_name(checkpoints, surfaces_root, tmp_path):
    with pytest.raises(ValueError, match=r"model.init_args.pooling: checkpoint 'max', config 'avg'.*change at test "
                                         r"time: exact_target_statistics, mode"):
        main(["test", *dann(surfaces_root, "source_only"), "--model.init_args.pooling", "avg",
              "--run.root", str(tmp_path), "--ckpt_path", str(checkpoints["source_only"])])
    with pytest.raises(ValueError, match=r"model.init_args.num_features: checkpoint 8, config 4"):
        main(["test", *padim(surfaces_root), "--model.init_args.num_features", "4", "--run.root", str(tmp_path),
              "--ckpt_path", str(checkpoints["padim"])])


def test_a_checkpoint_without_hyperparameters_is_tested_with_a_warning(checkpoints, surfaces_root, tmp_path):
    stripped = tmp_path / "old.ckpt"
    checkpoint = torch.load(checkpoints["padim"], weights_only=True)
    del checkpoint["hyper_parameters"]  # as DenseHybrid's were before it saved them
    torch.save(checkpoint, stripped)
    with pytest.warns(UserWarning, match=r"old.ckpt stores no model hyperparameters .* nothing checks that they match"):
        main(["test", *padim(surfaces_root), "--run.root", str(tmp_path / "runs"), "--ckpt_path", str(stripped)])


def test_a_test_on_other_data_is_filed_under_both_data_tags(checkpoints, surfaces_root, tmp_path):
    main(["test", *padim(surfaces_root, "grass"), "--run.root", str(tmp_path), "--ckpt_path", str(checkpoints["padim"])])
    trained_tag = checkpoints["padim"].parents[2].name
    (run_dir,) = (tmp_path / "padim").glob("*/version_0")
    assert run_dir.parent.name.startswith(f"{trained_tag}__on__") and "grass" in run_dir.parent.name
    assert (run_dir / "results.json").is_file()


def test_a_fresh_run_folder_gives_no_logs_directory_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # its files used to be in the folder before the CSV writer looked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *TOY, "--trainer.max_steps", "1", "--run.root", str(tmp_path)])
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]


def test_a_missing_root_is_the_first_line_on_stderr(tmp_path):
    missing = tmp_path / "missing"
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", "configs/padim/padim_surfaces.yaml",
         "--data.init_args.source.dataset", "mvtec", "--data.init_args.source.root", str(missing),
         "--run.root", str(tmp_path),
         "--run.wandb", "false"], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"error: FileNotFoundError: source domain: mvtec root {str(missing)!r} does not exist; expected "
        "<root>/<category>/train/good/*, test/<good|defect>/* and optionally ground_truth/<defect>/<stem>_mask.*"
    ), result.stderr[:2000]


@pytest.mark.parametrize("subcommand, options, first_line", [
    ("export", ["--ckpt_path", "missing.ckpt"],
     "error: ValueError: export needs --ckpt_path <checkpoint file> of a fitted model, got 'missing.ckpt'"),
    ("test", ["--ckpt_path", "missing.ckpt"], "error: FileNotFoundError: "),
])
def test_an_error_raised_by_our_own_checks_is_the_first_line_on_stderr(tmp_path, subcommand, options, first_line):
    result = subprocess.run(
        [sys.executable, "cli.py", subcommand, "--config", "configs/padim/padim_surfaces.yaml", *options,
         "--run.root", str(tmp_path), "--run.wandb", "false"], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith(first_line), result.stderr[:2000]


def test_a_missing_category_is_the_error_raised(make_mvtec, tmp_path):
    root = make_mvtec(categories=("bottle",), train=1, test_good=1, defects={"crack": 1})
    with pytest.raises(ConfigError, match=r"^FileNotFoundError: source domain: mvtec category 'carpet' not found"):
        main(["fit", *TOY, "--data", "datamodules.OneClassDataModule", "--data.init_args.source.dataset", "mvtec",
              "--data.init_args.source.root", str(root), "--data.init_args.source.category", "carpet",
              "--run.root", str(tmp_path)])


def wandb_processes() -> list[str]:
    """Processes of the W&B service started by this one (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and "wandb" in stat.with_name("cmdline").read_text():
            children.append(stat.parent.name)
    return children


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_the_wandb_files_are_complete_when_a_run_returns(tmp_path, monkeypatch):
    """The offline run file's last block is written when the W&B service closes the run's stream, after
    ``finish()`` returned; main() returns only once the service is gone, so no reader races it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["fit", *TOY, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--run.root", str(tmp_path)])
    assert wandb_processes() == []
    assert {"train/loss", "train/reconstruction"} <= summary(tmp_path / "toy" / "toy" / "version_0")["history_keys"]


def test_a_failed_start_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = make_folder_tree(tmp_path / "mvtec", categories=("bottle",), train=0)  # no train/good: fails in setup
    runs = tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match="train/good"):
        main(["fit", *TOY, "--data", "datamodules.OneClassDataModule", "--data.init_args.source.dataset", "mvtec",
              "--data.init_args.source.root", str(root), "--data.init_args.source.category", "bottle",
              "--data.init_args.image_size", "16", "--run.root", str(runs)])
    assert not list(runs.glob("*/*/*")), list(runs.rglob("*"))
    assert wandb_processes() == []
