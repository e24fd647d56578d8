"""DenseHybridAD (paper 004): hybrid energy / outlier-head dense anomaly detection with pasted negatives."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import torch

from lightning_modules.base import AnomalyDetectionModule
from lightning_modules.components.backbone import BackboneSpec, as_backbone_spec
from lightning_modules.components.batchnorm_statistics import trained_batch_norms
from lightning_modules.components.negative_pasting import (
    NegativeBankSpec,
    NegativePaster,
    PasteShape,
    negative_bank,
)
from lightning_modules.components.specs import spec_from
from lightning_modules.components.target_recalibration import (
    RECALIBRATION_OPTIONS,
    RecalibrationSpec,
    as_recalibration_spec,
    batchnorm_recalibration,
    target_shot_images,
    verdict_summary,
)
from lightning_modules.densehybrid.loss import densehybrid_loss
from lightning_modules.densehybrid.torch_model import (
    ANOMALY_SCORES,
    PASCAL_VOC_CLASSES,
    AnomalyScore,
    Build,
    DenseHybridModel,
    FreezePolicy,
)

PrimaryTask = Literal["none", "category"]
PRIMARY_TASKS: tuple[str, ...] = get_args(PrimaryTask)


class DenseHybridAD(AnomalyDetectionModule):
    """Segmentation logits read as an energy, an outlier head, and negatives pasted into normal images.

    Training pastes one negative into each normal image and minimises paper 004's equation 1 (with
    DenseHybrid's weighting): ``outlier_head_weight`` · BCE(outlier head, paste map) over all pixels +
    β · mean over pasted pixels of ln p̂(x) [+ per-pixel cross-entropy of the image's category on the
    normal pixels when ``primary_task: category``]. Test: s(x) = ln P(d_out|x) − ln p̂(x) per pixel; the
    image score is the ``image_score_quantile`` quantile of its map (1.0 = max).

    Args:
        build: ``light`` (offline default: packaged EfficientNet-Lite0 + a small decoder) or
            ``deeplabv3_resnet50`` (paper 004; needs ``deeplab_weights``).
        freeze: ``all`` (all but the last BN-ReLU-Conv of both heads), ``backbone`` or ``none``.
        primary_task: ``none`` (paper 004) or ``category`` (per-pixel classification of the image's
            ``domain_index``: train on a list of categories and set ``num_classes`` to its length).
        num_classes: channels of the logits head.
        backbone: the light build's feature extractor.
        decoder_channels: width of the light build's decoder.
        deeplab_weights: DeepLabV3-ResNet-50 state-dict file (``random``: untrained); never downloaded.
        negatives: the negative bank (``source: skimage`` offline, or an ADE20K-layout folder).
        paste_shape: ``mask`` (object shapes), ``rectangle`` or ``mixed`` (each with probability 0.5).
        paste_probability: chance that a training image receives a paste.
        paste_reference_size: image side at which paste sides run from 16 px in steps of 8 px; smaller
            images scale them down.
        beta: β of the energy term.
        outlier_head_weight: weight of the outlier head's BCE; ``None`` is DenseHybrid's 10 β.
        image_score_quantile: quantile of the anomaly map taken as the image score (1.0 = max).
        anomaly_score: ``hybrid`` (the method's s(x)); ``outlier_head`` or ``energy`` score with one term
            alone, for ablations.
        target_recalibration: ShiftAD's addition (``RecalibrationSpec``): at test/predict/export start, every
            BatchNorm trained on the source re-estimates its statistics on the DataModule's k unlabelled target
            shots (``data.init_args.target_shots``) and their views, layer after layer, shrunk toward the
            source statistics (weighted as ``prior_count`` images), each layer kept or declined by the held-out
            check (``adapt/kept``: any layer kept; ``adapt/layers_kept``: the share); the thresholds are then
            refitted on the validation split.
    """

    method_name = "densehybrid"
    # Scoring choices only: the weights do not depend on them.
    test_time_options = {**AnomalyDetectionModule.test_time_options, "anomaly_score": None,
                         "image_score_quantile": None, **RECALIBRATION_OPTIONS}

    def __init__(
        self,
        build: Build = "light",
        freeze: FreezePolicy = "all",
        primary_task: PrimaryTask = "none",
        num_classes: int = PASCAL_VOC_CLASSES,
        backbone: BackboneSpec | dict | None = None,
        decoder_channels: int = 128,
        deeplab_weights: str | None = None,
        negatives: NegativeBankSpec | dict | None = None,
        paste_shape: PasteShape = "mask",
        paste_probability: float = 1.0,
        paste_reference_size: int = 256,
        beta: float = 0.03,
        outlier_head_weight: float | None = None,
        image_score_quantile: float = 1.0,
        anomaly_score: AnomalyScore = "hybrid",
        target_recalibration: RecalibrationSpec | dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if primary_task not in PRIMARY_TASKS:
            raise ValueError(f"primary_task must be one of {', '.join(PRIMARY_TASKS)}, got {primary_task!r}")
        if beta < 0 or (outlier_head_weight is not None and outlier_head_weight < 0):
            raise ValueError(f"beta and outlier_head_weight must be >= 0, got {beta}, {outlier_head_weight}")
        if anomaly_score not in ANOMALY_SCORES:
            raise ValueError(f"anomaly_score must be one of {', '.join(ANOMALY_SCORES)}, got {anomaly_score!r}")
        if not 0 < image_score_quantile <= 1:
            raise ValueError(f"image_score_quantile must be in (0, 1], got {image_score_quantile}")
        backbone = as_backbone_spec(backbone)
        negatives = NegativeBankSpec() if negatives is None else spec_from(negatives, NegativeBankSpec, "negatives")
        self.target_recalibration = as_recalibration_spec(target_recalibration)
        if self.target_recalibration is not None and self.target_recalibration.align_channels:
            raise ValueError("target_recalibration.align_channels moves PaDiM's per-position Gaussians; DenseHybrid "
                             "re-estimates its BatchNorm statistics: leave it false")
        if self.target_recalibration is not None and self.target_recalibration.extractor_statistics:
            raise ValueError("target_recalibration.extractor_statistics is CS-Flow's (a frozen extractor); DenseHybrid "
                             "re-estimates the BatchNorm statistics it trained on the source anyway: leave it false")
        # In the checkpoint, so a test or a load rebuilds this model and scores as it was trained to; plain
        # types only, so the checkpoint loads with weights_only=True.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams.update(backbone=dataclasses.asdict(backbone), negatives=dataclasses.asdict(negatives),
                            target_recalibration=None if self.target_recalibration is None
                            else dataclasses.asdict(self.target_recalibration))
        self.model = DenseHybridModel(build, num_classes, freeze, backbone, decoder_channels, deeplab_weights)
        self.negatives = negatives
        self.paster = NegativePaster(negative_bank(self.negatives), paste_shape, paste_probability,
                                     reference_size=paste_reference_size)
        self.primary_task = primary_task
        self.num_classes = num_classes
        self.beta = beta
        self.outlier_head_weight = 10 * beta if outlier_head_weight is None else outlier_head_weight
        self.image_score_quantile = image_score_quantile
        self.anomaly_score = anomaly_score
        self.source_statistics: dict[str, torch.Tensor] | None = None  # the BatchNorms' before a recalibration

    def _class_targets(self, batch: dict) -> torch.Tensor | None:
        if self.primary_task == "none":
            return None
        targets = batch["domain_index"].long()
        if targets.max() >= self.num_classes:
            raise ValueError(f"primary_task=category: a batch has domain_index {int(targets.max())}, but the "
                             f"logits head has num_classes={self.num_classes}; set num_classes to the number "
                             f"of categories in data.category")
        return targets

    def _loss_terms(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        images, pasted = self.paster(batch["image"], generator)
        logits, outlier_logits = self.model(images)
        return densehybrid_loss(logits, outlier_logits, pasted, self.beta, self.outlier_head_weight,
                                self._class_targets(batch))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.checked_total(self._loss_terms(batch))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # The same pastes every epoch, so validation losses are comparable across epochs.
        generator = torch.Generator(device=batch["image"].device).manual_seed(self.negatives.seed + batch_idx)
        terms = self._loss_terms(batch, generator)
        size = len(batch["image"])
        self.log_dict({f"val/{name}": value for name, value in terms.items()}, sync_dist=True, batch_size=size)
        self.log("val/loss", sum(terms.values()), sync_dist=True, batch_size=size)
        self.record_held_out(batch, *self.anomaly_scores(batch["image"]))

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model.anomaly_map(images, self.anomaly_score)
        flat = maps.flatten(1)
        if self.image_score_quantile == 1.0:
            return flat.amax(1), maps
        return torch.quantile(flat, self.image_score_quantile, dim=1), maps

    def prepare_scoring(self, datamodule) -> None:
        if self.source_statistics is not None:  # a recalibration starts from the source, not from the last one
            self.model.load_state_dict(self.source_statistics, strict=False)
        if self.target_recalibration is not None:
            self.recalibrate_to_target(datamodule)

    @torch.no_grad()
    def recalibrate_to_target(self, datamodule) -> bool:
        """AdaBN of the BatchNorms trained on the source from the k target shots' views, shrunk toward the source
        statistics and checked layer by layer (``components.target_recalibration``); returns whether any layer
        was updated. Reads the shots' images only."""
        spec = self.target_recalibration
        images = target_shot_images(datamodule, "model.init_args.target_recalibration").to(self.device)
        layers = trained_batch_norms(self.model)
        if self.source_statistics is None:
            self.source_statistics = {f"{name}.{key}": getattr(layer, key).clone() for name, layer in layers
                                      for key in ("running_mean", "running_var")}
        was_training = self.model.training
        self.model.eval()
        try:
            verdicts = batchnorm_recalibration(self.model, layers, images, spec)
        finally:
            self.model.train(was_training)
        summary = verdicts.summary()
        line, metrics = verdict_summary(summary, summary.kept, spec, len(images))
        line += f"; {sum(verdicts.applied)} of {len(verdicts.names)} BatchNorm layers updated"
        self.report_recalibration(datamodule, summary.kept, line, {**metrics, "adapt/layers_kept": verdicts.kept_share})
        return summary.kept
