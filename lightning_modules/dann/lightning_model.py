"""Domain-adaptive defect classifier (paper 000) with the modes ``dann``, ``source_only``, ``adabn``.

Batches come from ``datamodules.PairedDomainDataModule``: training gives ``{"source", "target"}`` (target
labels hidden); validation and testing: ``DomainClassifierModule``. ADDA is its own module
(``lightning_modules.adda``).

- ``dann``: L = L_y(G_y(G_f(x_s)), y_s) + w · L_d(G_d(R_λ(G_f(x))), d), with R_λ the gradient reversal and
  λ(p) = 2/(1+exp(−γp)) − 1, p = global_step / total steps.
- ``source_only``: L_y on the source only.
- ``adabn``: ``source_only`` training; before evaluation the encoder's BatchNorm statistics for the target are
  re-estimated on the unlabelled target train images.
- ``dann`` with ``exact_target_statistics``: ``dann`` training; before testing and predicting, AdaBN's estimate
  replaces the target statistics that ``bn_policy: per_domain`` averaged over training batches.
"""

from __future__ import annotations

import dataclasses

import torch

from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.components.discriminator import domain_accuracy, domain_loss
from lightning_modules.components.domain_classifier_module import DomainClassifierModule
from lightning_modules.components.gradient_reversal import reversal_coefficient
from lightning_modules.dann.torch_model import DomainAdaptiveClassifier

MODES = ("dann", "source_only", "adabn")


class DANN(DomainClassifierModule):
    """Domain-adaptive normal/defect classifier.

    Args:
        backbone: backbone and weights (paper 000: ResNet-18 pretrained; offline: packaged EfficientNet-Lite0).
        layer: backbone stage whose output is pooled into features (-1 = the last).
        trainable: backbone module-name prefixes that are fine-tuned (``["*"]`` = all, as in the paper).
        bottleneck_dim: width of the features the head and the discriminator see.
        pooling: global pooling of the backbone map, ``avg`` (ResNet's) or ``max``.
        mode: ``dann``, ``source_only`` or ``adabn``.
        bn_policy: BatchNorm policy of the encoder: ``joint``, ``per_domain`` or ``frozen``.
        domain_loss_weight: w, the weight of the domain loss (1.0 in tllib).
        reversal_gamma: γ of the λ schedule (10 in DANN).
        discriminator_hidden: hidden width of the domain discriminator (1024 in tllib).
        backbone_lr_mult: learning-rate multiplier of the pretrained backbone (0.1 in tllib).
        exact_target_statistics: ``dann`` only: before the target is tested or predicted, each trainable BatchNorm's
            target statistics become the exact moments over the unlabelled target train images (AdaBN's estimate,
            with the final weights), instead of the running averages of augmented batches under weights that were
            still changing. Not at validation, where the statistics are still part of training. Changes nothing
            in training, so a ``dann`` checkpoint can be tested with it.
        selection, optimizer, scheduler, scheduler_interval: see ``DomainClassifierModule``.
    """

    method_name = "dann"
    #: adabn trains exactly as source_only does, so either checkpoint can be tested as the other.
    test_time_options = {**DomainClassifierModule.test_time_options,
                         "mode": frozenset({("source_only", "adabn"), ("adabn", "source_only")}),
                         "exact_target_statistics": None}

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
        exact_target_statistics: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r} (ADDA is lightning_modules.adda.ADDA)")
        if mode == "adabn" and bn_policy == "frozen":
            raise ValueError("mode='adabn' re-estimates BatchNorm statistics, but bn_policy='frozen' never learns "
                             "source statistics to replace; use bn_policy 'joint'")
        if exact_target_statistics and (mode != "dann" or bn_policy == "frozen"):
            raise ValueError(f"exact_target_statistics re-estimates the target BatchNorm statistics after dann "
                             f"training; it needs mode 'dann' and a bn_policy other than 'frozen', got mode "
                             f"{mode!r}, bn_policy {bn_policy!r} (mode 'adabn' does it after source_only training)")
        if domain_loss_weight < 0 or reversal_gamma < 0 or backbone_lr_mult < 0:
            raise ValueError("domain_loss_weight, reversal_gamma and backbone_lr_mult must be >= 0, got "
                             f"{domain_loss_weight}, {reversal_gamma}, {backbone_lr_mult}")
        backbone = backbone or BackboneSpec()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "backbone"])
        self.hparams["backbone"] = dataclasses.asdict(backbone)  # plain values: checkpoints load weights_only
        self.mode = mode
        self.method_name = mode  # run folders <root>/<mode>/...; `--ckpt_path last` resumes the same mode
        self.domain_loss_weight = domain_loss_weight
        self.reversal_gamma = reversal_gamma
        self.backbone_lr_mult = backbone_lr_mult
        self.exact_target_statistics = exact_target_statistics
        self.model = DomainAdaptiveClassifier(backbone, layer, trainable, bottleneck_dim, pooling, bn_policy,
                                              discriminator_hidden if mode == "dann" else 0)

    def parameter_groups(self) -> list[dict]:
        backbone = [p for p in self.model.encoder.extractor.parameters() if p.requires_grad]
        heads = [p for m in (self.model.encoder.bottleneck, self.model.head) for p in m.parameters()]
        if self.model.discriminator is not None:
            heads += list(self.model.discriminator.parameters())
        return [{"params": backbone, "lr_mult": self.backbone_lr_mult}, {"params": heads}]

    def reversal_lambda(self) -> float:
        """λ from the global step, so a resumed run continues the schedule where it stopped."""
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return reversal_coefficient(self.global_step / total, self.reversal_gamma)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        source, target = batch["source"], batch["target"]
        if self.mode == "dann":
            return self._dann_step(source["image"], source["label"], target["image"])
        logits = self.model(source["image"], "source")
        return self.checked_total({"classification": self.classification_loss(logits, source["label"])})

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
            "classification": self.classification_loss(logits, labels),
            "domain": self.domain_loss_weight * domain_loss(source_domain, target_domain),
        })

    def prepare_target_evaluation(self, stage: str) -> None:
        if not (self.mode == "adabn" or (self.exact_target_statistics and stage != "validate")):
            return
        loader = self.trainer.datamodule.target_statistics_dataloader()
        self.model.estimate_target_statistics(batch["image"].to(self.device) for batch in loader)
