"""DenseHybridAD (paper 004): hybrid energy / outlier-head dense anomaly detection with pasted negatives."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import torch

from lightning_modules.base import AnomalyDetectionModule
from lightning_modules.components.backbone import BackboneSpec, as_backbone_spec
from lightning_modules.components.negative_pasting import (
    NegativeBankSpec,
    NegativePaster,
    PasteShape,
    negative_bank,
)
from lightning_modules.components.specs import spec_from
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
    """

    method_name = "densehybrid"
    # Scoring choices only: the weights do not depend on them.
    test_time_options = {**AnomalyDetectionModule.test_time_options, "anomaly_score": None,
                         "image_score_quantile": None}

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
        # In the checkpoint, so a test or a load rebuilds this model and scores as it was trained to; plain
        # types only, so the checkpoint loads with weights_only=True.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams.update(backbone=dataclasses.asdict(backbone), negatives=dataclasses.asdict(negatives))
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
