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

from lightning_modules.base import ShiftADModule
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
        optimizer, scheduler, scheduler_interval: see ``ShiftADModule``.
    """

    def __init__(self, selection: str = "source", **kwargs) -> None:
        super().__init__(**kwargs)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
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

    def prepare_target_evaluation(self) -> None:
        """Runs before target images are scored (AdaBN re-estimates its statistics here)."""

    def _collect(self, collector: ScoreCollector, batch: dict, domain: str) -> None:
        probabilities = torch.sigmoid(self.model(batch["image"], domain).float())
        collector.update(probabilities, batch["label"], sample_ids(batch["path"]).to(self.device))

    def on_validation_epoch_start(self) -> None:
        for collector in self.val_scores:
            collector.reset()
        if getattr(self.trainer.datamodule, "target_val", False):
            self.prepare_target_evaluation()

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

    def on_test_epoch_start(self) -> None:
        self.test_domains = self.test_domain_names()
        self.test_scores = [ScoreCollector().to(self.device) for _ in self.test_domains]
        self.prepare_target_evaluation()

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
