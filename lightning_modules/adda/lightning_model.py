"""ADDA on paired-domain batches (``datamodules.PairedDomainDataModule``; evaluation: ``DomainClassifierModule``).

``pretrain_epochs`` of source training (M_s and C on the labelled source), then per batch: D learns to tell
M_s(x_s) (1) from M_t(x_t) (0), and M_t learns to make D call its features source (inverted-label GAN loss).
One optimizer per part (C with M_s, M_t, D) from the configured factory, stepped by hand.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy

from lightning_modules.adda.torch_model import AdversarialAdaptationClassifier
from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.components.discriminator import (
    SOURCE_LABEL,
    domain_accuracy,
    domain_loss,
    domain_targets,
)
from lightning_modules.components.domain_classifier_module import DomainClassifierModule

OPTIMIZERS = ("classifier", "target_encoder", "discriminator")


class ADDA(DomainClassifierModule):
    """Adversarial discriminative domain adaptation of the normal/defect classifier.

    Args:
        backbone: backbone and weights (paper 000: ResNet-18 pretrained; offline: packaged EfficientNet-Lite0).
        layer: backbone stage whose output is pooled into features (-1 = the last).
        trainable: backbone module-name prefixes that are fine-tuned (``["*"]`` = all).
        bottleneck_dim: width of the features the head and the discriminator see.
        pooling: global pooling of the backbone map, ``avg`` or ``max``.
        discriminator_hidden: hidden width of the domain discriminator (1024 in tllib).
        backbone_lr_mult: learning-rate multiplier of the pretrained backbone (0.1 in tllib).
        pretrain_epochs: source training epochs before the adversarial phase (>= 1).
        selection, optimizer, scheduler, scheduler_interval: see ``DomainClassifierModule`` (the scheduler is
            built once per optimizer and stepped with it).
    """

    method_name = "adda"

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        layer: str | int = -1,
        trainable: list[str] | None = None,
        bottleneck_dim: int = 256,
        pooling: str = "avg",
        discriminator_hidden: int = 1024,
        backbone_lr_mult: float = 0.1,
        pretrain_epochs: int = 5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if pretrain_epochs < 1:
            raise ValueError(f"ADDA needs pretrain_epochs >= 1 (source training), got {pretrain_epochs}")
        if backbone_lr_mult < 0:
            raise ValueError(f"backbone_lr_mult must be >= 0, got {backbone_lr_mult}")
        backbone = backbone or BackboneSpec()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "backbone"])
        self.hparams["backbone"] = dataclasses.asdict(backbone)  # plain values: checkpoints load weights_only
        self.backbone_lr_mult = backbone_lr_mult
        self.pretrain_epochs = pretrain_epochs
        self.model = AdversarialAdaptationClassifier(backbone, layer, trainable, bottleneck_dim, pooling,
                                                     discriminator_hidden)
        self.automatic_optimization = False

    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            raise ValueError("ADDA trains different parts in its two phases; under DDP set "
                             "trainer.strategy.init_args.find_unused_parameters: true "
                             "(or --trainer.strategy ddp_find_unused_parameters_true)")

    def configure_optimizers(self):
        model = self.model
        parts = {
            "classifier": [
                {"params": [p for p in model.encoder.extractor.parameters() if p.requires_grad],
                 "lr_mult": self.backbone_lr_mult},
                {"params": [*model.encoder.bottleneck.parameters(), *model.head.parameters()]}],
            "target_encoder": [
                {"params": [p for p in model.target_encoder.extractor.parameters() if p.requires_grad],
                 "lr_mult": self.backbone_lr_mult},
                {"params": list(model.target_encoder.bottleneck.parameters())}],
            "discriminator": [{"params": list(model.discriminator.parameters())}],
        }
        optimizers = []
        for name in OPTIMIZERS:
            optimizer = self.optimizer_factory([g for g in parts[name] if g["params"]])
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
            optimizers.append(optimizer)
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [self.scheduler_factory(optimizer) for optimizer in optimizers]

    def in_adversarial_phase(self) -> bool:
        return self.current_epoch >= self.pretrain_epochs

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Decided per batch from the epoch counter: a mid-epoch resume skips on_train_epoch_start.
        if self.in_adversarial_phase() and not self.model.source_frozen:
            self.model.begin_adversarial_phase()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        source, target = batch["source"], batch["target"]
        classifier_opt, target_opt, discriminator_opt = self.optimizers()
        if not self.in_adversarial_phase():
            logits = self.model(source["image"], "source")
            loss = self.checked_total({"classification": self.classification_loss(logits, source["label"])})
            self._manual_step(classifier_opt, loss, OPTIMIZERS.index("classifier"))
            return
        with torch.no_grad():
            source_features = self.model.features(source["image"], "source")  # frozen M_s
        target_features = self.model.features(target["image"], "target")  # M_t
        source_domain, target_domain = self.model.discriminate(source_features, target_features.detach())
        self.log("train/discriminator_accuracy", domain_accuracy(source_domain, target_domain), prog_bar=True)
        loss = self.checked_total({"domain": domain_loss(source_domain, target_domain)}, prefix="train_discriminator")
        self._manual_step(discriminator_opt, loss, OPTIMIZERS.index("discriminator"))
        # M_t's turn: the same joint pass (D's BatchNorm again sees both domains), loss on the target part only.
        _, fooled = self.model.discriminate(source_features, target_features)
        loss = self.checked_total({"confusion": F.binary_cross_entropy_with_logits(
            fooled.float(), domain_targets(fooled, SOURCE_LABEL))}, prefix="train_target_encoder")
        self._manual_step(target_opt, loss, OPTIMIZERS.index("target_encoder"))

    def _manual_step(self, optimizer, loss: torch.Tensor, index: int) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            (schedulers[index] if isinstance(schedulers, list) else schedulers).step()
