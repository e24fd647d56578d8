"""PaDiM as a ShiftAD anomaly detector: "training" is one pass of statistics, with no optimizer."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DistributedSampler

from lightning_modules.base import AnomalyDetectionModule
from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.components.frozen_ddp import FROZEN_DDP, FrozenModelDDPStrategy
from lightning_modules.components.target_recalibration import (
    Moments,
    RecalibrationSpec,
    as_recalibration_spec,
    embed_views,
    recalibrated,
    safety_check,
    target_shot_images,
    verdict_summary,
)
from lightning_modules.padim.torch_model import PadimModel

log = logging.getLogger(__name__)


class Padim(AnomalyDetectionModule):
    """PaDiM on any shared-builder backbone.

    Fit with ``trainer.max_epochs: 1``: the training images are accumulated into per-position sums,
    which are all-reduced across processes after the last batch of the epoch and turned into Gaussians;
    validation (held-out normals) then logs ``val/normal_score``, their mean image score. A further
    epoch starts the sums afresh. Data parallel: ``--trainer.strategy ddp_frozen``.

    Args:
        backbone: ``{name, pretrained, weights}`` of the shared builder.
        layers: three layers, module names or timm feature-stage indices (default: stages 1-3, ResNet's
            layer1-3; for efficientnet_lite0 blocks.1, blocks.2, blocks.4).
        num_features: size of the random channel subset (Rd100 for ResNet-18, Rd550 for WRN-50).
        feature_seed: seed of the random channel subset (named apart from the data's ``seed``).
        covariance_eps: ε of Σ + ε·I.
        blur_sigma: σ of the anomaly-map blur, in input pixels.
        target_recalibration: if set (``RecalibrationSpec``), after the source statistics are final the
            Gaussians move toward the DataModule's k unlabelled target shots (``data.init_args.target_shots``),
            kept or declined by the safety rule (logged as ``adapt/kept``), before the checkpoint is written.
    """

    method_name = "padim"

    def __init__(self, backbone: BackboneSpec | None = None, layers: list[str | int] | None = None,
                 num_features: int = 100, feature_seed: int = 0, covariance_eps: float = 0.01, blur_sigma: float = 4.0,
                 target_recalibration: RecalibrationSpec | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = PadimModel(backbone or BackboneSpec(), layers or [1, 2, 3], num_features, feature_seed,
                                covariance_eps, blur_sigma)
        self.target_recalibration = as_recalibration_spec(target_recalibration)
        if self.target_recalibration is not None and self.target_recalibration.extractor_statistics:
            raise ValueError("target_recalibration.extractor_statistics is CS-Flow's; PaDiM moves its Gaussians "
                             "(align_channels for the channel frame): leave it false")

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if stage == "fit" and isinstance(strategy, DDPStrategy) and not isinstance(strategy, FrozenModelDDPStrategy):
            raise ValueError(f"PaDiM has no trainable parameters, which torch's DistributedDataParallel refuses; "
                             f"use --trainer.strategy {FROZEN_DDP} (or --config configs/padim/ddp.yaml) instead of "
                             f"{type(strategy).__name__}")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        path = self._trainer.ckpt_path if self._trainer is not None else None
        self.model.statistics_origin = f"checkpoint {path}" if path else "the loaded checkpoint"

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images)

    def on_train_epoch_start(self) -> None:
        self.model.reset_statistics()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        keep = self._not_padding(batch_idx, images.shape[0]).to(images.device)
        with torch.no_grad():
            embedding = self.model.embed(images[keep])
            self.check_finite({"embedding": embedding})
            self.model.accumulate(embedding)

    def _not_padding(self, batch_idx: int, batch_size: int) -> torch.Tensor:
        """Which samples of the batch are real: a DistributedSampler repeats samples so that every process
        gets as many; counting them twice would make 2 processes differ from 1."""
        loader = self.trainer.train_dataloader
        positions = batch_idx * loader.batch_size + torch.arange(batch_size)
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return torch.ones(batch_size, dtype=torch.bool)
        # Sample j of rank r is entry j·W + r of the padded index list; entries from N on are repeats.
        return positions * sampler.num_replicas + sampler.rank < len(sampler.dataset)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:
            self.model.reduce_statistics(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
            self.log("train/images", self.model.count.float(), rank_zero_only=True)
            if self.target_recalibration is not None:
                self.recalibrate_to_target(self.trainer.datamodule)

    @torch.no_grad()
    def recalibrate_to_target(self, datamodule) -> bool:
        """Moves the source Gaussians toward the k target shots' views (see ``components.target_recalibration``)
        unless the safety rule declines; returns whether the update was kept. Reads the shots' images only."""
        spec = self.target_recalibration
        images = target_shot_images(datamodule, "model.init_args.target_recalibration").to(self.device)
        source = self.model.gaussians()
        shots = embed_views(self.model.embed, images, spec.views)
        self.check_finite({"target shot embedding": shots})
        verdict = safety_check(source, shots, spec, self.model.covariance_eps)
        kept = verdict.kept or not spec.safety
        if kept:
            update = recalibrated(source, Moments.of(shots.flatten(0, 1)), replace(spec, align_channels=verdict.aligned))
            self.model.set_gaussians(update, spec.prior_count + shots.shape[0] * shots.shape[1])
        line, metrics = verdict_summary(verdict, kept, spec, shots.shape[0])
        log.info(line)
        # one value per fit, written at the epoch's end whatever log_every_n_steps
        self.log_dict(metrics, rank_zero_only=True, on_step=False, on_epoch=True)
        return kept

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.model.is_fitted:  # the sanity check runs before the fit
            return
        scores, maps = self.model(batch["image"])
        self.log("val/normal_score", scores.mean(), sync_dist=True, batch_size=scores.shape[0])
        self.record_held_out(batch, scores, maps)
