"""Domain-adaptive defect classifier (paper 000) with the modes ``dann``, ``adda``, ``source_only``, ``adabn``.

Batches come from ``datamodules.PairedDomainDataModule``: training gives ``{"source", "target"}`` (target
labels hidden), validation the source val split (plus, with ``target_val``, the labelled target val split:
the oracle), testing ``[target test, source test]``.

- ``dann``: L = L_y(G_y(G_f(x_s)), y_s) + w · L_d(G_d(R_λ(G_f(x))), d), with R_λ the gradient reversal and
  λ(p) = 2/(1+exp(−γp)) − 1, p = global_step / total steps.
- ``source_only``: L_y on the source only.
- ``adabn``: ``source_only`` training; before evaluation the encoder's BatchNorm statistics for the target are
  re-estimated on the unlabelled target train images.
- ``adda``: ``adda_pretrain_epochs`` of source training, then M_t (a copy of the encoder) is trained so that
  G_d cannot tell its target features from the frozen source encoder's (inverted-label GAN loss).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy

from lightning_modules.base import ShiftADModule
from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.components.discriminator import (
    SOURCE_LABEL,
    domain_accuracy,
    domain_loss,
    domain_targets,
)
from lightning_modules.components.gradient_reversal import reversal_coefficient
from lightning_modules.components.metrics import ScoreCollector, accuracy, auroc, sample_ids
from lightning_modules.dann.torch_model import DomainAdaptiveClassifier

log = logging.getLogger(__name__)

MODES = ("dann", "adda", "source_only", "adabn")
SELECTIONS = ("source", "oracle")
TEST_DOMAINS = ("target", "source")  # PairedDomainDataModule.test_dataloader order
VAL_DOMAINS = ("source", "target_oracle")  # PairedDomainDataModule.val_dataloader order


class DANN(ShiftADModule):
    """Domain-adaptive normal/defect classifier.

    Args:
        backbone: backbone and weights (paper 000: ResNet-18 pretrained; offline: packaged EfficientNet-Lite0).
        layer: backbone stage whose output is pooled into features (-1 = the last).
        trainable: backbone module-name prefixes that are fine-tuned (``["*"]`` = all, as in the paper).
        bottleneck_dim: width of the features the head and the discriminator see.
        pooling: global pooling of the backbone map, ``avg`` (ResNet's) or ``max``.
        mode: ``dann``, ``adda``, ``source_only`` or ``adabn``.
        bn_policy: BatchNorm policy of the encoder: ``joint``, ``per_domain`` or ``frozen``.
        domain_loss_weight: w, the weight of the domain loss (1.0 in tllib).
        reversal_gamma: γ of the λ schedule (10 in DANN).
        discriminator_hidden: hidden width of the domain discriminator (1024 in tllib).
        backbone_lr_mult: learning-rate multiplier of the pretrained backbone (0.1 in tllib).
        adda_pretrain_epochs: ADDA's source pre-training epochs before the adversarial phase.
        selection: ``source`` (model selection on the source val split) or ``oracle`` (on labelled target
            val data; needs ``data.target_val: true`` and is reported as the oracle it is). It sets which
            metric ``selection_metric`` names for the checkpoint callback.
        optimizer, scheduler, scheduler_interval: see ``ShiftADModule`` (``adda`` builds one optimizer per
            part from the same factory and steps the scheduler itself).
    """

    method_name = "dann"

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        layer: str | int = -1,
        trainable: list[str] | None = None,
        bottleneck_dim: int = 256,
        pooling: str = "avg",
        mode: str = "dann",
        bn_policy: str = "joint",
        domain_loss_weight: float = 1.0,
        reversal_gamma: float = 10.0,
        discriminator_hidden: int = 1024,
        backbone_lr_mult: float = 0.1,
        adda_pretrain_epochs: int = 5,
        selection: str = "source",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if mode == "adda" and adda_pretrain_epochs < 1:
            raise ValueError(f"adda needs adda_pretrain_epochs >= 1 (source pre-training), got {adda_pretrain_epochs}")
        if mode == "adabn" and bn_policy == "frozen":
            raise ValueError("mode='adabn' re-estimates BatchNorm statistics, but bn_policy='frozen' never learns "
                             "source statistics to replace; use bn_policy 'joint'")
        if domain_loss_weight < 0 or reversal_gamma < 0 or backbone_lr_mult < 0:
            raise ValueError("domain_loss_weight, reversal_gamma and backbone_lr_mult must be >= 0, got "
                             f"{domain_loss_weight}, {reversal_gamma}, {backbone_lr_mult}")
        backbone = backbone or BackboneSpec()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "backbone"])
        self.hparams["backbone"] = dataclasses.asdict(backbone)  # plain values: checkpoints load weights_only
        self.mode = mode
        self.method_name = mode  # run folders <root>/<mode>/...; `--ckpt_path last` resumes the same mode
        self.selection = selection
        self.domain_loss_weight = domain_loss_weight
        self.reversal_gamma = reversal_gamma
        self.backbone_lr_mult = backbone_lr_mult
        self.adda_pretrain_epochs = adda_pretrain_epochs
        self.model = DomainAdaptiveClassifier(
            backbone, layer, trainable, bottleneck_dim, pooling, bn_policy,
            discriminator_hidden if mode in ("dann", "adda") else 0, with_target_encoder=mode == "adda",
        )
        self.automatic_optimization = mode != "adda"
        self.val_scores = [ScoreCollector() for _ in VAL_DOMAINS]
        self.test_scores = [ScoreCollector() for _ in TEST_DOMAINS]
        self.test_results: dict[str, float] = {}

    @property
    def selection_metric(self) -> str:
        """The metric model selection monitors (maximised)."""
        return "val/target_oracle_accuracy" if self.selection == "oracle" else "val/source_accuracy"

    # ------------------------------------------------------------------------------------------ setup

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
        strategy = self.trainer.strategy
        if (self.mode == "adda" and isinstance(strategy, DDPStrategy)
                and not strategy._ddp_kwargs.get("find_unused_parameters", False)):
            raise ValueError("mode='adda' trains different parts in its two phases; under DDP set "
                             "trainer.strategy.init_args.find_unused_parameters: true "
                             "(or --trainer.strategy ddp_find_unused_parameters_true)")

    def parameter_groups(self) -> list[dict]:
        if self.mode == "adda":
            raise RuntimeError("adda builds its own optimizers (configure_optimizers)")
        backbone = [p for p in self.model.encoder.extractor.parameters() if p.requires_grad]
        heads = [p for m in (self.model.encoder.bottleneck, self.model.head) for p in m.parameters()]
        if self.model.discriminator is not None:
            heads += list(self.model.discriminator.parameters())
        return [{"params": backbone, "lr_mult": self.backbone_lr_mult}, {"params": heads}]

    def configure_optimizers(self):
        if self.mode != "adda":
            return super().configure_optimizers()
        model = self.model
        backbone = [p for p in model.encoder.extractor.parameters() if p.requires_grad]
        target_backbone = [p for p in model.target_encoder.extractor.parameters() if p.requires_grad]
        parts = {
            "classifier": [{"params": backbone, "lr_mult": self.backbone_lr_mult},
                           {"params": [*model.encoder.bottleneck.parameters(), *model.head.parameters()]}],
            "target_encoder": [{"params": target_backbone, "lr_mult": self.backbone_lr_mult},
                               {"params": list(model.target_encoder.bottleneck.parameters())}],
            "discriminator": [{"params": list(model.discriminator.parameters())}],
        }
        optimizers = []
        for groups in parts.values():
            optimizer = self.optimizer_factory([g for g in groups if g["params"]])
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
            optimizers.append(optimizer)
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [self.scheduler_factory(optimizer) for optimizer in optimizers]

    # ------------------------------------------------------------------------------------------ training

    def reversal_lambda(self) -> float:
        """λ from the global step, so a resumed run continues the schedule where it stopped."""
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return reversal_coefficient(self.global_step / total, self.reversal_gamma)

    def on_train_epoch_start(self) -> None:
        if self.mode != "adda" or self.current_epoch < self.adda_pretrain_epochs:
            return
        if not bool(self.model.target_encoder_ready):
            self.model.init_target_encoder()
        self.model.freeze_source()  # requires_grad is not in checkpoints: frozen again after a resume

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        source, target = batch["source"], batch["target"]
        if self.mode == "adda":
            self._adda_step(source["image"], source["label"], target["image"])
            return None
        if self.mode in ("source_only", "adabn"):
            logits = self.model(source["image"], "source")
            return self.checked_total({"classification": self._classification_loss(logits, source["label"])})
        return self._dann_step(source["image"], source["label"], target["image"])

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def _dann_step(self, source: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        source_features, target_features = self.model.paired_features(source, target)
        logits = self.model.classify(source_features)
        lam = self.reversal_lambda()
        # One discriminator pass over both domains, so its BatchNorm sees source and target together.
        domain_logits = self.model.discriminate(torch.cat([source_features, target_features]), reversal=lam)
        source_domain, target_domain = domain_logits[: source.shape[0]], domain_logits[source.shape[0]:]
        self.log("train/grl_lambda", lam)
        self.log("train/discriminator_accuracy", domain_accuracy(source_domain, target_domain), prog_bar=True)
        return self.checked_total({
            "classification": self._classification_loss(logits, labels),
            "domain": self.domain_loss_weight * domain_loss(source_domain, target_domain),
        })

    def _adda_step(self, source: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> None:
        classifier_opt, target_opt, discriminator_opt = self.optimizers()
        if self.current_epoch < self.adda_pretrain_epochs:
            loss = self.checked_total({"classification": self._classification_loss(self.model(source, "source"),
                                                                                    labels)})
            self._manual_step(classifier_opt, loss, 0)
            return
        with torch.no_grad():
            source_features = self.model.features(source, "source")  # frozen M_s
        target_features = self.model.features(target, "target")  # M_t
        # G_d learns to tell M_s(x_s) (1) from M_t(x_t) (0) ...
        source_domain = self.model.discriminate(source_features)
        target_domain = self.model.discriminate(target_features.detach())
        self.log("train/discriminator_accuracy", domain_accuracy(source_domain, target_domain), prog_bar=True)
        loss = self.checked_total({"domain": domain_loss(source_domain, target_domain)}, prefix="train_discriminator")
        self._manual_step(discriminator_opt, loss, 2)
        # ... and M_t learns to make G_d call its features source (inverted labels).
        fooled = self.model.discriminate(target_features)
        loss = self.checked_total({"confusion": F.binary_cross_entropy_with_logits(
            fooled.float(), domain_targets(fooled, SOURCE_LABEL))}, prefix="train_target_encoder")
        self._manual_step(target_opt, loss, 1)

    def _manual_step(self, optimizer, loss: torch.Tensor, index: int) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            (schedulers[index] if isinstance(schedulers, list) else schedulers).step()

    # ------------------------------------------------------------------------------------------ evaluation

    def embed(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        """Encoder features of ``domain`` images (for the t-SNE figures)."""
        return self.model.features(images, domain)

    def _refresh_target_statistics(self) -> None:
        if self.mode != "adabn":
            return
        loader = self.trainer.datamodule.target_statistics_dataloader()
        self.model.estimate_target_statistics(batch["image"].to(self.device) for batch in loader)

    def _collect(self, collector: ScoreCollector, batch: dict, domain: str) -> None:
        probabilities = torch.sigmoid(self.model(batch["image"], domain).float())
        collector.update(probabilities, batch["label"], sample_ids(batch["path"]).to(self.device))

    def on_validation_epoch_start(self) -> None:
        for collector in self.val_scores:
            collector.reset()
        if getattr(self.trainer.datamodule, "target_val", False):
            self._refresh_target_statistics()

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
        for collector in self.test_scores:
            collector.reset()
        self._refresh_target_statistics()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        domain = TEST_DOMAINS[dataloader_idx]
        self._collect(self.test_scores[dataloader_idx], batch, domain)

    def on_test_epoch_end(self) -> None:
        results = {}
        for name, collector in zip(TEST_DOMAINS, self.test_scores, strict=True):
            probabilities, labels = collector.compute()
            results[f"{name}_accuracy"] = accuracy(probabilities, labels)
            if labels.unique().numel() == 2:
                results[f"{name}_auroc"] = auroc(probabilities, labels)
        self.test_results = results
        self.log_dict({f"test/{k}": v for k, v in results.items()}, sync_dist=False)
