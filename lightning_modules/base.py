"""What every ShiftAD LightningModule shares: optimizers from the config, loss guards, evaluation."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.components.calibration import (
    HeldOutScores,
    ScoreCalibration,
    ThresholdSpec,
    as_threshold_spec,
    prediction,
)
from lightning_modules.components.metrics import ScoreCollector, image_metrics, pixel_metrics, sample_ids
from lightning_modules.components.target_recalibration import target_shot_images

#: ``threshold`` may change at test/predict time (its fields as the CLI flattens them, and as a whole).
THRESHOLD_OPTIONS: dict[str, None] = {"threshold": None,
                                      **{f"threshold.{f.name}": None for f in dataclasses.fields(ThresholdSpec)}}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; the run stops before any weight is overwritten."""


def adam() -> OptimizerCallable:
    return lambda params: torch.optim.Adam(params, lr=1e-3)


class ShiftADModule(LightningModule):
    """Base of every method.

    Args:
        optimizer: built on the trainable parameter groups only (``class_path``/``init_args`` in YAML).
        scheduler: optional learning-rate scheduler, stepped every ``scheduler_interval``.
        scheduler_interval: ``step`` or ``epoch``.
    """

    #: short name used for run folders and W&B tags.
    method_name = "method"
    #: init arguments that ``test``/``validate``/``predict --ckpt_path`` may set to another value than the
    #: checkpoint's: name -> the allowed (checkpoint value, new value) pairs, or None for any value.
    test_time_options: dict[str, frozenset[tuple] | None] = {}

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        self.optimizer_factory = optimizer or adam()
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        #: the DataModule hyperparameters of the fit, once a checkpoint is loaded (None before)
        self.fitted_data: dict | None = None

    def parameter_groups(self) -> list[dict]:
        """Trainable parameter groups; a group may carry ``lr_mult``, applied to the optimizer's lr."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    def configure_optimizers(self):
        groups = [g for g in self.parameter_groups() if g["params"]]
        if not groups:
            return None
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Stops the run, naming the step and the term, when a loss term (or statistic) is NaN or Inf.

        Every process stops together (a process that stopped alone would leave the others waiting).
        """
        bad = [(name, value.detach()) for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
        if self._trainer is not None and self.trainer.world_size > 1:
            if not self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
                return
        elif not bad:
            return
        if bad:
            name, value = bad[0]
            shown = value.float().item() if value.numel() == 1 else "non-finite"
            where = f"loss term {name!r} is {shown}"
        else:
            where = "a loss term is non-finite on another process"
        raise NonFiniteLossError(
            f"{type(self).__name__}: {where} at global step {self.global_step} (epoch {self.current_epoch}); "
            f"the run stops here and the last checkpoint is left as it was"
        )

    def checked_total(self, terms: dict[str, torch.Tensor], prefix: str = "train") -> torch.Tensor:
        """Sums loss terms after checking each is finite, and logs each one (averaged over processes)."""
        self.check_finite(terms)
        total = sum(terms.values())
        self.log_dict({f"{prefix}/{name}": value.detach() for name, value in terms.items()}, sync_dist=True)
        self.log(f"{prefix}/loss", total.detach(), prog_bar=True, sync_dist=True)
        return total

    def on_train_start(self) -> None:
        # Lightning keeps the module modes it finds; a resumed fit (no sanity check before it) must train in the
        # modes of a fresh one. Each model's train() keeps its frozen parts in eval.
        self.train()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [name for name, value in checkpoint["state_dict"].items()
               if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise NonFiniteLossError(
                f"{type(self).__name__}: not saving a checkpoint at global step {self.global_step}: non-finite "
                f"values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the last good checkpoint is kept"
            )
        checkpoint["shiftad_method"] = type(self).__name__
        data_tag = getattr(self.trainer.datamodule, "run_tag", None) if self._trainer is not None else None
        if data_tag is not None:
            checkpoint["shiftad_data_tag"] = data_tag  # a later test on other data is filed under both tags
        checkpoint["rng_states"] = rng_states()
        # Dataclass arguments given in Python (not through the CLI) as plain dicts: loadable with weights_only.
        hparams = checkpoint.get("hyper_parameters")
        if hparams:
            # The threshold spec in effect, field by field, so that a test or predict of this checkpoint can change
            # one field; dataclasses given in Python (not the CLI) as plain dicts, loadable with weights_only.
            hparams = dict(hparams)
            if "threshold" in hparams and hasattr(self, "threshold"):
                hparams["threshold"] = self.threshold
            checkpoint["hyper_parameters"] = {
                key: dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
                for key, v in hparams.items()}

    def test_domain_names(self) -> tuple[str, ...]:
        """The domain of each test dataloader, in order: the DataModule's ``test_dataloader_names``, else
        ``("target",)``. Test metrics are logged as ``test/<domain>/<metric>``."""
        datamodule = self.trainer.datamodule
        names = tuple(getattr(datamodule, "test_dataloader_names", None) or ("target",))
        loaders = len(self.trainer.num_test_batches)
        if len(names) != loaders or len(set(names)) != len(names):
            raise ValueError(f"{type(datamodule).__name__}.test_dataloader_names is {names}, but the test has "
                             f"{loaders} dataloader(s): it needs one distinct name per test dataloader")
        return names

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("shiftad_method")
        if saved is not None and saved != type(self).__name__:
            raise ValueError(
                f"this checkpoint was written by method {saved!r}, but the model is {type(self).__name__!r}; "
                f"pick the config of {saved!r} or a checkpoint of {type(self).__name__!r}"
            )
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        self.fitted_data = checkpoint.get("datamodule_hyper_parameters")


class AnomalyDetectionModule(ShiftADModule):
    """Base of the anomaly detectors: one evaluation path for every method.

    Subclasses implement :meth:`anomaly_scores`. Test batches are the sample dicts of ``datamodules``.
    Each test dataloader is one domain (:meth:`test_domain_names`) with its own image and pixel collectors,
    gathered across ranks and ranked before any curve is computed; metrics are ``test/<domain>/<metric>``.
    The figure keeps anomaly maps of the first dataloader (the target).

    Decision thresholds (``self.calibration``, see ``components.calibration``) are fitted at the end of each
    validation epoch from the scores a subclass's ``validation_step`` hands to :meth:`record_held_out` (held-out
    source normals; never test images), before that epoch's checkpoint is written. At test and predict start,
    :meth:`prepare_scoring` runs, then :meth:`ready_thresholds`.

    Args:
        threshold: how the thresholds are fitted (``ThresholdSpec``: ``method`` quantile | f1_adaptive | manual,
            ``quantile``, manual ``image_threshold``/``pixel_threshold``, ``calibrate_on`` source | target_shots).
        aupro_fpr_limit: upper FPR limit of AUPRO (0.3 is the MVTec AD definition).
        num_map_examples: how many test samples keep their anomaly maps for the figure grid.
    """

    #: evaluation-only arguments: a test of a checkpoint may change them freely.
    test_time_options = {"aupro_fpr_limit": None, "num_map_examples": None, **THRESHOLD_OPTIONS}

    def __init__(self, *args, threshold: ThresholdSpec | None = None, aupro_fpr_limit: float = 0.3,
                 num_map_examples: int = 8, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threshold = as_threshold_spec(threshold)
        self.calibration = ScoreCalibration()
        self.held_out = HeldOutScores()
        self.aupro_fpr_limit = aupro_fpr_limit
        self.num_map_examples = num_map_examples
        # One collector per test dataloader, made at the start of each test (the DataModule sets how many).
        self.image_scores = torch.nn.ModuleList()
        self.pixel_scores = torch.nn.ModuleList()
        self.map_examples: dict[str, torch.Tensor] = {}
        self.test_domains: tuple[str, ...] = ()
        self.test_results: dict[str, float] = {}

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images [B, 3, H, W] in [0, 1] -> (image scores [B], anomaly maps [B, h, w] or None)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ thresholds

    def record_held_out(self, batch: dict, scores: torch.Tensor, maps: torch.Tensor | None) -> None:
        """A validation batch's scores (held-out labelled images), for this epoch's thresholds."""
        self.held_out.update(batch, scores, maps)

    def on_validation_epoch_start(self) -> None:
        self.held_out.reset()

    def on_validation_epoch_end(self) -> None:
        # Runs before Lightning's checkpoint callbacks save this epoch (on_validation_end / on_train_epoch_end).
        if self.trainer.sanity_checking or self.held_out.empty:
            return
        self.held_out.fit(self.calibration, self.threshold, "source", "the validation split")
        self.held_out.reset()
        self.log_calibration("val")

    def log_calibration(self, prefix: str) -> None:
        summary = self.calibration.summary()
        values = {f"{prefix}/{kind}_threshold": summary[f"{kind}_threshold"] for kind in ("image", "pixel")}
        self.log_dict({key: value for key, value in values.items() if value is not None})

    def prepare_scoring(self, datamodule) -> None:
        """Whatever scoring needs from the data before the first image (reference banks); called at test and
        predict start and by the exporter. Nothing for methods whose fit holds everything."""

    def report_recalibration(self, datamodule, kept: bool, line: str, metrics: dict[str, float]) -> None:
        """After ``prepare_scoring`` recalibrated toward the target shots: a kept update changed the scores the
        checkpoint's thresholds were fitted on, so they are refitted on the validation split (else dropped); the
        decision is logged, and at test also as metrics."""
        if kept and not self.fit_thresholds_on_validation(datamodule):
            self.calibration.reset()
        rank_zero_info(line)
        if self._trainer is not None and self.trainer.testing:
            self.log_dict(metrics, rank_zero_only=True, on_step=False, on_epoch=True)

    def fit_thresholds_on_validation(self, datamodule) -> bool:
        """Fits the thresholds from the DataModule's validation split; False when it has none."""
        loaders = datamodule.val_dataloader() if hasattr(datamodule, "val_dataloader") else []
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        if not loader:
            return False
        self.held_out.reset()
        with torch.no_grad():
            for batch in loader:
                if "image" not in batch:
                    return False  # episodes, not images (the meta-comparer's references carry its thresholds)
                scores, maps = self.anomaly_scores(batch["image"].to(self.device))
                self.held_out.update(batch, scores, maps)
        self.held_out.fit(self.calibration, self.threshold, "source", "the validation split")
        self.held_out.reset()
        return True

    def ready_thresholds(self, datamodule, stage: str) -> None:
        """Thresholds for ``stage`` (test or predict): the checkpoint's when they were fitted as
        ``threshold`` asks, else refitted from the DataModule's validation split (with a warning), else, at
        predict, an error saying what to pass. Then ``calibrate_on: target_shots`` moves them to the target."""
        spec, calibration = self.threshold, self.calibration
        if spec.method == "manual":
            calibration.set_manual(spec)
        elif not calibration.matches(spec):
            had = "no thresholds" if not calibration.is_fitted else (
                f"thresholds fitted by {calibration.method}"
                + (f" q={calibration.quantile}" if calibration.quantile is not None else ""))
            if self.fit_thresholds_on_validation(datamodule):
                rank_zero_warn(f"{type(self).__name__}: the checkpoint has {had}; fitted {spec.method} thresholds "
                               f"on the DataModule's validation split (held-out source normals) instead")
            elif stage == "predict":
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint has {had} and the DataModule "
                    f"{type(datamodule).__name__} has no validation split to fit them on; pass them: "
                    f"--model.init_args.threshold.method manual --model.init_args.threshold.image_threshold <score> "
                    f"[--model.init_args.threshold.pixel_threshold <map value>], or use the DataModule the model "
                    f"was trained with")
            else:
                rank_zero_warn(f"{type(self).__name__}: {had} and no validation split to fit them on; the test "
                               f"metrics do not need them, but predictions would")
        if spec.calibrate_on == "target_shots" and spec.method == "manual":
            rank_zero_warn("threshold.calibrate_on target_shots is ignored with method manual: manual thresholds "
                           "are used as given")
        elif spec.calibrate_on == "target_shots" and calibration.is_fitted and calibration.domain != "target":
            self.calibrate_on_target_shots(datamodule)
        if calibration.is_fitted:
            summary = calibration.summary()
            rank_zero_info(f"{stage} thresholds ({summary['method']}, calibrated on {summary['domain']}): image "
                           f"{summary['image_threshold']}, pixel {summary['pixel_threshold']}")

    def calibrate_on_target_shots(self, datamodule) -> None:
        """``calibrate_on: target_shots``: shifts the thresholds to the target from the DataModule's k unlabelled
        target normals (see ``ScoreCalibration.shift_to_target``). Only the shots' images are read, never their
        labels."""
        images = target_shot_images(datamodule, "model.init_args.threshold.calibrate_on target_shots")
        scores, pixels = [], []
        with torch.no_grad():
            for chunk in images.split(16):
                chunk_scores, maps = self.anomaly_scores(chunk.to(self.device))
                scores.append(chunk_scores.float().cpu())
                if maps is not None:
                    pixels.append(maps.float().flatten().cpu())
        self.calibration.shift_to_target(torch.cat(scores), torch.cat(pixels) if pixels else None, len(images))
        rank_zero_info(f"{type(self).__name__}: thresholds moved to the target from {len(images)} target shots")

    def on_test_start(self) -> None:
        self.prepare_scoring(self.trainer.datamodule)
        self.ready_thresholds(self.trainer.datamodule, "test")

    def on_predict_start(self) -> None:
        self.prepare_scoring(self.trainer.datamodule)
        self.ready_thresholds(self.trainer.datamodule, "predict")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """The prediction of a batch of the predict contract (``image`` [B, 3, H, W] in [0, 1], ``path``):
        raw and normalised scores and maps, the decisions and the calibration they came from."""
        scores, maps = self.anomaly_scores(batch["image"])
        return prediction(batch, scores, maps, self.calibration)

    # ------------------------------------------------------------------------------------------ test

    def on_test_epoch_start(self) -> None:
        self.test_domains = self.test_domain_names()
        self.image_scores = torch.nn.ModuleList(ScoreCollector() for _ in self.test_domains).to(self.device)
        self.pixel_scores = torch.nn.ModuleList(ScoreCollector() for _ in self.test_domains).to(self.device)
        self.map_examples = {}

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        scores, maps = self.anomaly_scores(batch["image"])
        ids = sample_ids(batch["path"]).to(scores.device)
        self.image_scores[dataloader_idx].update(scores, batch["label"], ids)
        if maps is None:
            return
        masks = batch["mask"][:, 0]
        maps = F.interpolate(maps[:, None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        with_mask = batch["has_mask"].bool()
        if with_mask.any():
            self.pixel_scores[dataloader_idx].update(maps[with_mask], masks[with_mask], ids[with_mask])
        if dataloader_idx == 0:
            self._keep_examples(batch["image"], masks, maps)

    def _keep_examples(self, images: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor) -> None:
        taken = self.map_examples.get("image", torch.empty(0)).shape[0]
        room = self.num_map_examples - taken
        if room <= 0:
            return
        new = {"image": images[:room], "mask": masks[:room], "map": maps[:room]}
        for key, value in new.items():
            value = value.detach().float().cpu()
            self.map_examples[key] = torch.cat([self.map_examples[key], value]) if key in self.map_examples else value

    def on_test_epoch_end(self) -> None:
        results = {}
        for domain, image_scores, pixel_scores in zip(self.test_domains, self.image_scores, self.pixel_scores,
                                                      strict=True):
            metrics = image_metrics(*image_scores.compute())
            # A category has masks for all its samples or for none, so with one category per domain every
            # process takes the same branch (a process skipping the gather alone would stall the others).
            if not pixel_scores.scores:
                rank_zero_warn(f"pixel metrics skipped on the {domain} test set: it has no ground-truth masks "
                               f"(image metrics only)")
            else:
                maps, masks = pixel_scores.compute()
                metrics.update(pixel_metrics(maps, masks, self.aupro_fpr_limit))
            results.update({f"test/{domain}/{k}": v for k, v in metrics.items() if math.isfinite(v)})
        self.test_results = results
        self.log_dict(results)


def rng_states() -> dict:
    """The global RNG states (torch, CUDA, numpy, python) as plain tensors and ints, loadable with
    ``weights_only=True``; a resumed fit draws what the uninterrupted one would."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": python_version, "state": list(python_state), "gauss": python_gauss},
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gauss"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))


def freeze(modules: Iterable[torch.nn.Module]) -> None:
    """Frozen means no gradient and eval mode (BatchNorm statistics stay as loaded)."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()
