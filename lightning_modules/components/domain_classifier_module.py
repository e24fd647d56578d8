"""What the domain-adaptive defect classifiers (DANN and its baselines, ADDA) share: model selection, and the
validation and test passes over ``datamodules.PairedDomainDataModule``.

Validation gives the source val split (plus, with ``target_val``, the labelled target val split: the oracle),
testing one labelled split per name of the DataModule's ``test_dataloader_names`` (``[target test, source
test]``), logged as ``test/<domain>/accuracy`` and ``test/<domain>/auroc``. A subclass holds ``self.model`` with
``model(images, domain)`` → defect logits and ``model.features(images, domain)``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.base import THRESHOLD_OPTIONS, ShiftADModule
from lightning_modules.components.calibration import (
    ScoreCalibration,
    ThresholdSpec,
    as_threshold_spec,
    prediction,
)
from lightning_modules.components.metrics import ScoreCollector, accuracy, auroc, sample_ids

log = logging.getLogger(__name__)

SELECTIONS = ("source", "oracle")
VAL_DOMAINS = ("source", "target_oracle")  # PairedDomainDataModule.val_dataloader order


class DomainClassifierModule(ShiftADModule):
    """Base of the domain-adaptive normal/defect classifiers.

    Args:
        selection: ``source`` (model selection on the source val split) or ``oracle`` (on labelled target val
            data; needs ``data.target_val: true`` and is reported as the oracle it is). It sets which metric
            ``selection_metric`` names for the checkpoint callback.
        threshold: how the decision threshold on the defect probability is fitted (``ThresholdSpec``), on the
            labelled source val split at the end of each validation epoch: ``quantile`` of its normals'
            probabilities, ``f1_adaptive`` (its defects are labelled) or ``manual``. ``calibrate_on:
            target_shots`` is not available here (the paired data has no target shots).
        optimizer, scheduler, scheduler_interval: see ``ShiftADModule``.

    ``predict`` scores images as target images (ADDA's target encoder, AdaBN's target statistics).
    """

    test_time_options = THRESHOLD_OPTIONS

    def __init__(self, selection: str = "source", threshold: ThresholdSpec | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.threshold = as_threshold_spec(threshold)
        if self.threshold.calibrate_on != "source":
            raise ValueError("model.init_args.threshold.calibrate_on target_shots needs target normal shots, which "
                             "the paired-domain classifiers do not have; use calibrate_on source")
        self.calibration = ScoreCalibration()
        self.selection = selection
        self.val_scores = [ScoreCollector() for _ in VAL_DOMAINS]
        self.test_domains: tuple[str, ...] = ()
        self.test_scores: list[ScoreCollector] = []
        self.test_results: dict[str, float] = {}

    @property
    def selection_metric(self) -> str:
        """The metric model selection monitors (maximised)."""
        return "val/target_oracle_accuracy" if self.selection == "oracle" else "val/source_accuracy"

    def setup(self, stage: str) -> None:
        monitors = [c.monitor for c in self.trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
        if self.selection != "oracle" and any("target" in m for m in monitors):
            raise ValueError(f"checkpoint.monitor {monitors} selects with target labels; that is the oracle and "
                             "must be asked for by name: model.init_args.selection: oracle")
        if self.selection == "oracle":
            log.warning("ORACLE model selection: checkpoints are chosen with TARGET LABELS (%s); report the "
                        "results as oracle, not as unsupervised domain adaptation", self.selection_metric)
            if not getattr(self.trainer.datamodule, "target_val", False):
                raise ValueError("selection='oracle' needs the labelled target val split: set data.target_val: true")

    @staticmethod
    def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def embed(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        """Encoder features of ``domain`` images (for the t-SNE figures)."""
        return self.model.features(images, domain)

    def prepare_target_evaluation(self, stage: str) -> None:
        """Runs before target images are scored at ``stage`` (validate, test or predict); AdaBN re-estimates its
        statistics here."""

    def defect_probability(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        """The classifier's score: the probability of a defect, images seen as ``domain`` (source or target)."""
        return torch.sigmoid(self.model(images, domain).float())

    def _collect(self, collector: ScoreCollector, batch: dict, domain: str) -> None:
        probabilities = self.defect_probability(batch["image"], domain)
        collector.update(probabilities, batch["label"], sample_ids(batch["path"]).to(self.device))

    def on_validation_epoch_start(self) -> None:
        for collector in self.val_scores:
            collector.reset()
        if getattr(self.trainer.datamodule, "target_val", False):
            self.prepare_target_evaluation("validate")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(self.val_scores[dataloader_idx], batch, "source" if dataloader_idx == 0 else "target")

    def on_validation_epoch_end(self) -> None:
        for name, collector in zip(VAL_DOMAINS, self.val_scores, strict=True):
            if collector.update_count == 0:
                continue
            probabilities, labels = collector.compute()
            self.log(f"val/{name}_accuracy", accuracy(probabilities, labels), sync_dist=False)
            loss = F.binary_cross_entropy(probabilities.double().clamp(1e-7, 1 - 1e-7), labels.double())
            self.log(f"val/{name}_loss", float(loss), sync_dist=False)
            if name == "source" and not self.trainer.sanity_checking:  # before this epoch's checkpoint is saved
                self.calibration.fit(self.threshold, probabilities, labels, where="the source val split")
                self.log("val/image_threshold", float(self.calibration.image_threshold), sync_dist=False)

    def fit_thresholds_on_validation(self, datamodule) -> bool:
        """Fits the threshold on the DataModule's source val split (a checkpoint without one)."""
        loaders = datamodule.val_dataloader() if hasattr(datamodule, "val_dataloader") else []
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        if not loader:
            return False
        collector = ScoreCollector().to(self.device)
        with torch.no_grad():
            for batch in loader:
                batch = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                         for key, value in batch.items()}
                self._collect(collector, batch, "source")
        probabilities, labels = collector.compute()
        self.calibration.fit(self.threshold, probabilities, labels, where="the source val split")
        return True

    def ready_thresholds(self, datamodule, stage: str) -> None:
        """The checkpoint's threshold when fitted as ``threshold`` asks, else one fitted on the source val split
        (with a warning), else at predict an error saying what to pass."""
        spec, calibration = self.threshold, self.calibration
        if spec.method == "manual":
            calibration.set_manual(spec)
            return
        if calibration.matches(spec):
            return
        if self.fit_thresholds_on_validation(datamodule):
            rank_zero_warn(f"{type(self).__name__}: the checkpoint has no {spec.method} threshold; fitted it on the "
                           f"DataModule's source val split")
        elif stage == "predict":
            raise ValueError(f"{type(self).__name__}: the checkpoint has no {spec.method} threshold and "
                             f"{type(datamodule).__name__} has no validation split to fit one; pass "
                             f"--model.init_args.threshold.method manual --model.init_args.threshold.image_threshold "
                             f"<defect probability>")

    def on_predict_start(self) -> None:
        self.prepare_target_evaluation("predict")
        self.ready_thresholds(self.trainer.datamodule, "predict")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """The prediction of a predict batch (scored as target images): the defect probability is the score."""
        probabilities = self.defect_probability(batch["image"], "target")
        return prediction(batch, probabilities, None, self.calibration)

    def on_test_epoch_start(self) -> None:
        self.test_domains = self.test_domain_names()
        self.test_scores = [ScoreCollector().to(self.device) for _ in self.test_domains]
        self.ready_thresholds(self.trainer.datamodule, "test")
        self.prepare_target_evaluation("test")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Any split but the source is scored as target (ADDA's target encoder, AdaBN's target statistics).
        domain = "source" if self.test_domains[dataloader_idx] == "source" else "target"
        self._collect(self.test_scores[dataloader_idx], batch, domain)

    def on_test_epoch_end(self) -> None:
        results = {}
        for domain, collector in zip(self.test_domains, self.test_scores, strict=True):
            probabilities, labels = collector.compute()
            results[f"test/{domain}/accuracy"] = accuracy(probabilities, labels)
            if labels.unique().numel() == 2:
                results[f"test/{domain}/auroc"] = auroc(probabilities, labels)
        self.test_results = results
        self.log_dict(results, sync_dist=False)
