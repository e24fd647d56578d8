"""ShiftAD command line: ``python cli.py fit|validate|test|predict|export --config configs/...``.

Every run lands in ``<run.root>/<method>/<data tag>/<version>/`` (config, CSV metrics, W&B files,
checkpoints, results and figures). A version folder is never reused, except by ``fit --ckpt_path
last``, which continues the newest run of the same method and data in place, and by a requeued SLURM
job, which continues its ``slurm_<job id>`` folder from its newest good checkpoint by itself. A continued
run keeps each earlier attempt's ``config.yaml`` and ``metrics.csv`` as ``config.<k>.yaml`` and
``metrics.<k>.csv`` (k = 1 for the first launch); the unsuffixed files are the latest attempt's.

A new ``version_N`` is claimed with an exclusive ``mkdir``, so launches started together never share one.
A launch that fails before its first batch removes the folder it claimed (it holds nothing to keep).

``test``/``validate``/``predict --ckpt_path <file>`` build the model from the checkpoint's hyperparameters.
The checkpoint must hold the config's method (class), or the command stops naming both. An init
argument set explicitly (config file or command line) to another value than the checkpoint's is applied
when the method lists it in ``test_time_options`` (e.g. DANN's ``mode`` source_only -> adabn), and
refused by name otherwise; ``fit`` from a checkpoint accepts no such change. A test of a checkpoint
trained on other data than it is tested on goes to ``<method>/<trained tag>__on__<tested tag>/``, so it
never sits among the runs trained on the tested data.

``export --ckpt_path <file> --export.format onnx|torch_export|torchscript [--export.out DIR]`` trains nothing: it
loads the checkpoint as ``predict`` does, readies scoring and thresholds as ``predict`` does at its start, and writes
``model.onnx``/``model.pt2``/``model.pt`` and ``model.json`` into ``--export.out`` or a new run folder
(``lightning_modules.components.export``). It runs on the CPU, with no logger.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import sys
import traceback
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

import datamodules  # noqa: F401  (registers the DataModules for --help and class_path lookup)
import lightning_modules  # noqa: F401  (registers the methods)
from callbacks import AnomalyMapGrid, PredictionWriter, ResultsWriter
from callbacks.checkpointing import (
    AtomicCheckpointIO,
    RunCheckpoint,
    check_checkpoint_file,
    keep_earlier_attempt,
    last_checkpoint,
    requeued_checkpoint,
)
from callbacks.preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint
from callbacks.tracking import build_loggers, finish_wandb, wandb_loggers
from lightning_modules.base import ShiftADModule
from lightning_modules.components.export import FILE_NAMES, ExportSpec, export_model
from lightning_modules.components.sync_batchnorm import TimmSyncBatchNorm

RUN_DIR_ENV = "SHIFTAD_RUN_DIR"
EXPORT = "export"


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config into the run folder as ``config.yaml`` (a resumed run has moved the earlier
    attempts' aside, ``keep_earlier_attempt``) and to W&B."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in wandb_loggers(trainer.loggers):
            logger.experiment.config.update({"cli": config}, allow_val_change=True)


def _next_version(parent: Path) -> str:
    numbers = [int(m.group(1)) for p in parent.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return f"version_{max(numbers, default=-1) + 1}"


def _claim_new_version(parent: Path) -> Path:
    """Creates the next free ``version_N``. ``mkdir`` fails when another launch created that folder between
    our scan and our claim; we then take the next number."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        folder = parent / _next_version(parent)
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder


def _reached_a_batch(trainer: Trainer | None) -> bool:
    """Whether a launch got as far as a batch: a run that stopped there (a NaN, a crash) keeps its folder,
    config and log for the post-mortem; only a launch that failed before any batch is a failed start."""
    if trainer is None:
        return False
    loops = (trainer.fit_loop.epoch_loop.batch_progress, trainer.validate_loop.batch_progress,
             trainer.test_loop.batch_progress, trainer.predict_loop.batch_progress)
    return any(progress.total.ready > 0 for progress in loops)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-") or "run"


def _import_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _flatten(values, prefix: str = "") -> dict:
    """Nested dicts/Namespaces as ``{"a.b": leaf}``; tuples as lists, so parsed and stored values compare."""
    if hasattr(values, "as_dict"):
        values = values.as_dict()
    if isinstance(values, dict):
        flat = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: list(values) if isinstance(values, tuple) else values}


def _set_nested(values: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if values.get(key) is None:  # an option the checkpoint left unset, or did not have yet
            values[key] = {}
        values = values[key]
    values[leaf] = value


class ConfigError(ValueError):
    """A class of the config refused its arguments while the CLI built it (the cause is the class's own error)."""


def _construction_cause(error: BaseException) -> BaseException | None:
    """The error a model/data class raised in ``__init__``, which jsonargparse wraps in "Does not validate
    against any of the Union subtypes" (the data and model groups are ``<class> | None`` unions)."""
    cause = None
    while isinstance(error, ValueError) and "Union subtypes" in str(error) and error.__cause__ is not None:
        error = cause = error.__cause__
    return cause


def _check_same_method(ckpt_path: str, stored_name: str | None, stored_path: str | None, config_path: str,
                       model_class: type | None) -> None:
    """Stops, naming both, when a checkpoint holds another method (class) than the config's model."""
    if model_class is None or (stored_name is None and stored_path is None):
        return
    stored_class = _import_class(stored_path) if stored_path else None
    same = stored_class is model_class if stored_class is not None else stored_name == model_class.__name__
    if same:
        return

    def describe(cls: type | None, path: str | None, name: str | None) -> str:
        method = getattr(cls, "method_name", None) or name or path
        return f"{method!r} ({path or name})"

    checkpoint_method = describe(stored_class, stored_path, stored_name)
    config_method = describe(model_class, config_path, model_class.__name__)
    raise ValueError(
        f"--ckpt_path {ckpt_path}: the checkpoint holds method {checkpoint_method}, but the config's model is "
        f"{config_method}; use the config of {checkpoint_method} or a checkpoint of {config_method}"
    )


class ShiftADTrainer(Trainer):
    """Lightning's Trainer with :meth:`export`, which LightningCLI turns into the ``export`` subcommand."""

    def export(self, model: ShiftADModule, datamodule: LightningDataModule | None = None, ckpt_path: str | None = None,
               export: ExportSpec | None = None) -> Path:
        """Export a fitted model to ONNX, torch.export or TorchScript with its model.json (no training)."""
        spec = export or ExportSpec()
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading)
        model.trainer = self
        # What predict's start needs: the DataModule set up and attached (reference banks, AdaBN statistics,
        # thresholds fitted on its validation split when the checkpoint has none).
        self._data_connector.attach_datamodule(model, datamodule=datamodule)
        datamodule.setup("predict")
        model.eval()
        with torch.no_grad():
            model.on_predict_start()
        path = export_model(model, datamodule, ckpt_path, spec, Path(self.default_root_dir))
        rank_zero_info(f"exported {type(model).__name__} from {ckpt_path} to {path} and {path.parent / 'model.json'}")
        return path


class ShiftADCLI(LightningCLI):
    def __init__(self, **kwargs) -> None:
        self.claimed_run_dir: Path | None = None  # a version_N this launch created
        self.checkpoint_data_tag: str | None = None  # the data tag an explicit checkpoint was trained on
        try:
            super().__init__(
                model_class=ShiftADModule,
                trainer_class=ShiftADTrainer,
                subclass_mode_model=True,
                datamodule_class=LightningDataModule,
                subclass_mode_data=True,
                save_config_callback=RunConfigSaver,
                auto_configure_optimizers=False,
                seed_everything_default=0,
                trainer_defaults={"callbacks": [ResultsWriter(), AnomalyMapGrid(), PredictionWriter(), PreemptionCheckpoint()]},
                **kwargs,
            )
        except BaseException:
            self._discard_failed_start()
            raise

    def _discard_failed_start(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            finish_wandb(trainer.loggers, exit_code=1)  # its files live in the folder that may go
        run_dir = self.claimed_run_dir
        # A folder claimed by this launch holds a checkpoint, results or a metric row only after a batch.
        if run_dir is not None and run_dir.is_dir() and not _reached_a_batch(trainer):
            shutil.rmtree(run_dir, ignore_errors=True)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), EXPORT: {"model", "datamodule"}}

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        self._args = args

    def _explicit_model_args(self, subcommand: str) -> dict:
        """The model's init arguments given in a config file or on the command line (no defaults)."""
        parse = self.parser.parse_object if isinstance(self._args, (dict, Namespace)) else self.parser.parse_args
        explicit = parse(self._args, defaults=False)[subcommand].get("model")
        init_args = explicit.get("init_args") if explicit is not None else None
        return _flatten(init_args) if init_args is not None else {}

    def _set_seed(self) -> None:
        # Quiet, so that a config error is the first line on stderr; the seed is in config.yaml and the W&B tags.
        seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
        level = seed_logger.level
        seed_logger.setLevel(logging.WARNING)
        try:
            super()._set_seed()
        finally:
            seed_logger.setLevel(level)

    def _parse_ckpt_path(self) -> None:
        """An explicit checkpoint file: checked, its method compared with the config's, its hyperparameters
        put into the model config with the explicit test-time options on top (Lightning would silently
        replace the config's model and every model argument)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand == EXPORT and (ckpt_path is None or not Path(ckpt_path).is_file()):
            raise ValueError(f"export needs --ckpt_path <checkpoint file> of a fitted model, got {ckpt_path!r}")
        if ckpt_path in (None, "best", "last", "hpc", "registry"):
            return
        check_checkpoint_file(Path(ckpt_path))
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        self.checkpoint_data_tag = checkpoint.get("shiftad_data_tag")
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        stored_path = hparams.pop("_class_path", None)
        config_path = self.config[subcommand]["model"]["class_path"]
        model_class = _import_class(config_path)
        _check_same_method(ckpt_path, checkpoint.get("shiftad_method"), stored_path, config_path, model_class)
        if not hparams:
            rank_zero_warn(f"{ckpt_path} stores no model hyperparameters (written before its method saved them): "
                           f"the config's model arguments are used as given, and nothing checks that they match "
                           f"the model that was trained")
            return
        self._apply_test_time_options(subcommand, ckpt_path, hparams, model_class)
        model = {"class_path": stored_path, "dict_kwargs": hparams} if stored_path else hparams
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _apply_test_time_options(self, subcommand: str, ckpt_path: str, hparams: dict, model_class: type | None) -> None:
        """Explicit model arguments that differ from the checkpoint's: the legal test-time ones go into
        ``hparams``; any other stops the command, naming each."""
        stored = _flatten(hparams)
        options = getattr(model_class, "test_time_options", {}) if subcommand != "fit" else {}

        def checkpoint_has(key: str) -> bool:
            """The key, or None above it (an unset option), or an option newer than the checkpoint."""
            parents = [".".join(key.split(".")[:depth]) for depth in range(1, key.count(".") + 1)]
            return key in stored or any(stored.get(p, "") is None for p in parents) or key in options

        differing = {key: (stored.get(key), value) for key, value in self._explicit_model_args(subcommand).items()
                     if checkpoint_has(key) and stored.get(key) != value}
        if not differing:
            return

        def legal(key: str, change: tuple) -> bool:
            return key in options and (options[key] is None or change in options[key])

        refused = {key: change for key, change in differing.items() if not legal(key, change)}
        if refused:
            listed = "; ".join(f"model.init_args.{key}: checkpoint {old!r}, config {new!r}"
                               for key, (old, new) in refused.items())
            allowed = ", ".join(sorted(options)) if options else "none"
            raise ValueError(
                f"{subcommand} --ckpt_path {ckpt_path}: the config sets model arguments that differ from those "
                f"the checkpoint was trained with, and cannot change at {subcommand} time: {listed}. "
                f"Options this method can change at {subcommand} time: {allowed}. Drop the others, or use a "
                f"checkpoint trained with them"
            )
        for key, (_, value) in differing.items():
            _set_nested(hparams, key, value)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="Folder under which every run gets its own folder.")
        parser.add_argument("--run.version", type=str | None, default=None,
                            help="Name of the run folder; default: the next version_N (or slurm_<job id>).")
        parser.add_argument("--run.wandb", type=bool, default=True, help="Log to Weights & Biases (offline without login).")
        parser.add_argument("--run.wandb_project", type=str, default="shiftad", help="W&B project.")
        parser.add_argument("--run.log_model", type=bool, default=False, help="Upload checkpoints as W&B model artifacts.")
        parser.add_argument("--run.test_after_fit", type=bool, default=False,
                            help="After fit, test the best checkpoint (by checkpoint.monitor) or the final weights.")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")

    def _run_dir(self, method: str, tag: str) -> tuple[Path, Path | None]:
        """(run folder, checkpoint to resume or None) for this launch; every DDP rank gets the same."""
        config = self.config_init[self.subcommand]
        parent = Path(config["run"]["root"]) / _safe(method) / _safe(tag)
        ckpt_path = config.get("ckpt_path")
        resume = last_checkpoint(parent, method, tag) if ckpt_path == "last" else None
        if os.environ.get(RUN_DIR_ENV) and "LOCAL_RANK" in os.environ:  # a rank spawned by this launch
            return Path(os.environ[RUN_DIR_ENV]), resume
        if config["run"]["version"]:
            version = _safe(config["run"]["version"])
        elif resume is not None and self.subcommand == "fit":
            return resume.parent.parent, resume
        elif os.environ.get("SLURM_JOB_ID"):
            version = f"slurm_{os.environ['SLURM_JOB_ID']}"
            if self.subcommand == "fit" and ckpt_path is None:  # a requeued job continues its own folder
                return parent / version, requeued_checkpoint(parent / version)
        elif os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
            version = f"torchrun_{os.environ['TORCHELASTIC_RUN_ID']}"
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Ranks started together by an outside launcher cannot agree on "the next version" safely.
            raise ValueError(
                f"multi-process launch (WORLD_SIZE={os.environ['WORLD_SIZE']}) without a shared run name: pass "
                f"the same --run.version <name> to every rank, or use torchrun --rdzv-id <id>"
            )
        else:
            self.claimed_run_dir = _claim_new_version(parent)
            return self.claimed_run_dir, resume
        return parent / version, resume

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.config_init[self.subcommand]
        method = getattr(self.model, "method_name", type(self.model).__name__.lower())
        tag = getattr(self.datamodule, "run_tag", type(self.datamodule).__name__.lower())
        if self.subcommand != "fit" and self.checkpoint_data_tag not in (None, tag):
            tag = f"{self.checkpoint_data_tag}__on__{tag}"
        if self.subcommand == EXPORT:
            return self._export_trainer(method, tag)
        run_dir, resume = self._run_dir(method, tag)
        # Ranks started by Lightning's launcher inherit this, so they agree on the folder.
        os.environ[RUN_DIR_ENV] = str(run_dir)
        if resume is not None:
            config["ckpt_path"] = str(resume)
        if rank_zero_only.rank == 0:  # one process renames, even when every rank was started by srun or torchrun
            keep_earlier_attempt(run_dir)
        if config.get("weights_only") is None:
            config["weights_only"] = True  # a checkpoint file cannot run code
        checkpoint: RunCheckpoint = config["checkpoint"]
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(run_dir / "checkpoints")
        trainer_config = config["trainer"]
        if trainer_config.get("logger") in (None, True):
            describe = getattr(self.datamodule, "describe", dict)()
            tags = [method] + [f"{k}:{v}" for k, v in describe.items() if v is not None]
            tags.append(f"seed:{config['seed_everything']}")
            kwargs["logger"] = build_loggers(
                run_dir,
                run_name=f"{method}/{tag}/{run_dir.name}",
                tags=tags[:64],
                project=config["run"]["wandb_project"],
                use_wandb=config["run"]["wandb"],
                log_model=config["run"]["log_model"],
            )
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if trainer_config.get("sync_batchnorm") and not any(isinstance(plugin, LayerSync) for plugin in plugins):
            plugins.append(TimmSyncBatchNorm())  # torch's conversion drops timm's activations
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(plugin, ClusterEnvironment) for plugin in plugins):
            # PreemptionCheckpoint owns SIGUSR1: it saves at a batch boundary, then requeues.
            plugins.append(SLURMEnvironment(auto_requeue=False))
        kwargs["plugins"] = plugins
        kwargs["default_root_dir"] = str(run_dir)
        return super().instantiate_trainer(**kwargs)

    def _export_trainer(self, method: str, tag: str) -> ShiftADTrainer:
        """Export trains nothing: on the CPU, without loggers, callbacks or checkpoints; its folder is
        ``--export.out`` or a new run folder."""
        spec = self.config_init[EXPORT]["export"] or ExportSpec()
        out = Path(spec.out) if spec.out else self._run_dir(method, tag)[0]
        existing = [name for name in (*FILE_NAMES.values(), "model.json") if (out / name).exists()]
        if existing:
            raise FileExistsError(f"--export.out {out} already holds {', '.join(existing)}; choose another folder")
        return ShiftADTrainer(accelerator="cpu", devices=1, logger=False, callbacks=[], enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out))

    def after_fit(self) -> None:
        if not self.config_init[self.subcommand]["run"]["test_after_fit"]:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.monitor else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True)


def main(args: list[str] | None = None) -> ShiftADCLI:
    """Runs the CLI. A class that refuses its config arguments raises :class:`ConfigError`, whose message
    (the class's own) the command line prints as the first line on stderr."""
    torch.set_float32_matmul_precision("high")
    inherited_run_dir = os.environ.get(RUN_DIR_ENV)  # set only in a rank spawned by a launch
    try:
        cli = ShiftADCLI(args=args)
    except SIGTERMException:
        sys.exit(PREEMPTED_EXIT_CODE)
    except ValueError as error:
        cause = _construction_cause(error)
        if cause is None:
            raise
        raise ConfigError(f"{type(cause).__name__}: {cause}") from cause
    finally:
        # A later run in this process (a sweep, a notebook) must get its own folder, even after a DDP run
        # that left LOCAL_RANK behind or a run that failed.
        if inherited_run_dir is None:
            os.environ.pop(RUN_DIR_ENV, None)
    finish_wandb(cli.trainer.loggers)
    return cli


def run_command_line() -> None:
    """``main`` for the shell: a bad value, file or checkpoint (a ``ValueError`` or ``FileNotFoundError``, from
    the config or from the run) is the first line on stderr, then its traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        message = error if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
        print(f"error: {message}\n", file=sys.stderr)
        traceback.print_exception(error.__cause__ if isinstance(error, ConfigError) else error, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_command_line()
