"""CS-Flow LightningModules: phase 1 (flow on frozen, cached features) and phase 2 (few-shot extractor adaptation).

Phase 1, :class:`CSFlow`: the extractor is frozen, so each training image's 3-scale features are computed
once and reused every later epoch; the flow learns the normal feature density. The Figure-4 baselines of
paper 001 are this same module on other training sets (source, full target, k target shots, source + k).

Phase 2, :class:`CSFlowAdaptation`: a phase-1 checkpoint is loaded, the flow and the later extractor blocks
are frozen, and the first N MBConv blocks minimise the same NLL on the k target normal shots, so the flow
(a density of *source* features) pulls the target features back onto the source manifold.

Either phase may add ShiftAD's target recalibration (``target_recalibration``, also at test/predict time on a
checkpoint): the frozen flow's outputs are standardised toward k unlabelled target shots before scoring, kept or
declined by a held-out check on the shots (``components.target_recalibration``). Phase 1 may first move the
frozen extractor's BatchNorm statistics per scale (``extractor_statistics``): the shots are then normalised at
every layer as the training images were, kept only if the shots' pseudo-defect separation does not drop, and
the flow-output standardisation is the fallback where it is declined.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_modules.base import AnomalyDetectionModule
from lightning_modules.components.backbone import BackboneSpec, as_backbone_spec
from lightning_modules.components.batchnorm_statistics import input_moments, named_batch_norms, restorer
from lightning_modules.components.pseudo_defect_check import (
    SeparationVerdict,
    pseudo_defect_set,
    separation,
    verdict,
)
from lightning_modules.components.target_recalibration import (
    RECALIBRATION_OPTIONS,
    VIEW_COUNTS,
    RecalibrationSpec,
    Views,
    as_recalibration_spec,
    batchnorm_recalibration,
    cycled_flips,
    flow_output_recalibration,
    target_shot_images,
    training_images,
    verdict_summary,
    views_per_shot,
)
from lightning_modules.components.torch_files import load_torch_file
from lightning_modules.csflow.torch_model import SCALES, BNPolicy, CSFlowModel, rescaled

log = logging.getLogger(__name__)
#: shots the extractor recalibration needs under the safety rule (one to hold out, one to fit)
EXTRACTOR_MIN_SHOTS = 2


class FeatureCache:
    """3-scale features of training images keyed by a digest of the image's pixels.

    Valid only while the extractor is frozen: the features are then a pure function of the pixels.
    Keyed by content, not path, because ``source+target_shots`` holds one file under two shifts.
    """

    def __init__(self) -> None:
        self.entries: dict[str, list[torch.Tensor]] = {}

    @staticmethod
    def keys(images: torch.Tensor) -> list[str]:
        flat = images.detach().cpu().contiguous().numpy()
        return [hashlib.sha1(image.tobytes()).hexdigest() for image in flat]

    def features(self, images: torch.Tensor, extract) -> list[torch.Tensor]:
        keys = self.keys(images)
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        if missing:
            with torch.no_grad():
                fresh = extract(images[missing])
            for row, index in enumerate(missing):
                self.entries[keys[index]] = [f[row].float().cpu() for f in fresh]
        return [torch.stack([self.entries[key][scale] for key in keys]).to(images.device)
                for scale in range(len(self.entries[keys[0]]))]

    def __len__(self) -> int:
        return len(self.entries)


class CSFlowDetector(AnomalyDetectionModule):
    """What both phases share: the NLL step, validation NLL, the test-time scores and target recalibration.

    Args:
        target_recalibration: if set (``RecalibrationSpec``), at test/predict/export start the flow outputs are
            standardised toward the DataModule's k unlabelled target shots (``data.init_args.target_shots``),
            unless the safety rule declines (``adapt/kept``); the thresholds are then refitted on the validation
            split under the standardisation.
    """

    model: CSFlowModel
    test_time_options = {**AnomalyDetectionModule.test_time_options, **RECALIBRATION_OPTIONS}

    def __init__(self, *args, target_recalibration: RecalibrationSpec | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.target_recalibration = as_recalibration_spec(target_recalibration)

    def prepare_scoring(self, datamodule) -> None:
        self.model.set_output_standardisation(None, None)
        self.model.use_scale_statistics = False
        if self.target_recalibration is not None:
            self.recalibrate_to_target(datamodule)

    @torch.no_grad()
    def recalibrate_to_target(self, datamodule) -> bool:
        """With ``extractor_statistics``, first moves the extractor's statistics toward the k target shots' views;
        where that is declined (or k = 1 under the safety rule), standardises the flow outputs toward them unless
        their own rule declines. Returns whether an update was kept. Reads the shots' images only."""
        spec = self.target_recalibration
        if spec.align_channels:
            raise ValueError("target_recalibration.align_channels moves PaDiM's per-position Gaussians; CS-Flow "
                             "standardises its flow outputs per channel already: leave it false")
        images = target_shot_images(datamodule, "model.init_args.target_recalibration").to(self.device)
        lines, metrics = [], {}
        if spec.extractor_statistics:
            kept, line, metrics = self.recalibrate_extractor(datamodule, images)
            if kept:
                self.report_recalibration(datamodule, True, line, {**metrics, "adapt/kept": 1.0})
                return True
            lines.append(line)
        z = views_per_shot(lambda chunk: self.model.flow(self.model.features(chunk))[0], images, spec.views, 16)
        self.check_finite({"target shot flow output": torch.cat([t.flatten() for t in z])})
        standardisation, verdict = flow_output_recalibration(z, spec)
        kept = verdict.kept or not spec.safety
        if kept:
            self.model.set_output_standardisation(standardisation.mean, standardisation.std)
        line, output_metrics = verdict_summary(verdict, kept, spec, len(images))
        self.report_recalibration(datamodule, kept, "; then ".join([*lines, line]), {**metrics, **output_metrics})
        return kept

    def recalibrate_extractor(self, datamodule, images: torch.Tensor) -> tuple[bool, str, dict[str, float]]:
        """Per scale, the frozen extractor's BatchNorms re-estimated from the shots' views, each anchored to its
        input over the training images and kept or declined on its own (``batchnorm_recalibration``); the result
        is kept as a whole only if the shots' pseudo-defect separation is at least the source's. One shot leaves
        no image to hold out, so under the safety rule it is not tried. Returns (kept, log line, metrics)."""
        spec = self.target_recalibration
        if spec.safety and len(images) < EXTRACTOR_MIN_SHOTS:
            return False, (f"extractor statistics not tried: {len(images)} shot leaves none to hold out (the safety "
                           f"rule needs {EXTRACTOR_MIN_SHOTS})"), {"adapt/extractor_kept": 0.0}
        key = "model.init_args.target_recalibration.extractor_statistics"
        source_images = training_images(datamodule, key, fitted_data=self.fitted_data).to(self.device)
        extractor = self.model.extractor
        layers = named_batch_norms(extractor)
        put_back_own_statistics = restorer(layers)  # the extractor's own statistics stay the source's
        verdicts = []
        was_training = self.model.training
        self.model.eval()
        try:
            for scale, statistics in zip(SCALES, self.model.scale_statistics, strict=True):
                def forward(chunk: torch.Tensor, scale: float = scale) -> torch.Tensor:
                    return extractor(rescaled(chunk, scale))

                source = input_moments(forward, layers, source_images.split(16))
                verdicts.append(batchnorm_recalibration(forward, layers, images, spec, source))
                for name, layer in layers:
                    statistics.store(name, layer.running_mean, layer.running_var)
                put_back_own_statistics()
            decision = self.pseudo_defect_verdict(
                images, spec.views, lambda updated: setattr(self.model, "use_scale_statistics", updated))
        finally:
            put_back_own_statistics()
            self.model.use_scale_statistics = False
            self.model.train(was_training)
        kept = decision.kept or not spec.safety
        self.model.use_scale_statistics = kept
        applied = [applied for layer_verdicts in verdicts for applied in layer_verdicts.applied]
        line = (f"target recalibration of the extractor's statistics from {len(images)} shots x "
                f"{VIEW_COUNTS[spec.views]} views: {'kept' if kept else 'declined'}; {sum(applied)} of "
                f"{len(applied)} BatchNorm layers x scales updated (pseudo-defect separation AUROC: updated "
                f"{decision.adapted:.3f}, source {decision.source:.3f}{'' if spec.safety else '; safety rule off'})")
        return kept, line, {**decision.figures, "adapt/extractor_kept": float(kept),
                            "adapt/layers_kept": sum(applied) / len(applied)}

    def pseudo_defect_verdict(self, shots: torch.Tensor, views: Views,
                              use_update: Callable[[bool], None]) -> SeparationVerdict:
        """The shots' pseudo-defect separation with the update (``use_update(True)``), then without it
        (``use_update(False)``, left so); kept when it does not drop (``components.pseudo_defect_check``)."""
        images, labels = pseudo_defect_set(shots, views)

        def image_scores(chunk: torch.Tensor) -> torch.Tensor:
            return self.anomaly_scores(chunk)[0]

        use_update(True)
        adapted = separation(image_scores, images, labels)
        use_update(False)
        return verdict(adapted, separation(image_scores, images, labels))

    def setup(self, stage: str) -> None:
        data_size = getattr(self.trainer.datamodule, "image_size", None) if self._trainer is not None else None
        if data_size is not None and data_size != self.model.image_size:
            raise ValueError(f"data image_size={data_size} but the flow was built for image_size="
                             f"{self.model.image_size}; set model.init_args.image_size (phase 1) or "
                             f"data.init_args.image_size to the same side")

    def nll_terms(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z, log_det = self.model.flow(features)
        return {"nll": self.model.nll(z, log_det).mean()}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        z, log_det = self.model.flow(self.model.features(images))
        nll = self.model.nll(z, log_det).mean()
        self.log("val/nll", nll, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        self.record_held_out(batch, *self.model.anomaly_scores(z, images.shape[-2:]))

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, _ = self.model.flow(self.model.features(images))
        return self.model.anomaly_scores(z, images.shape[-2:])


class CSFlow(CSFlowDetector):
    """Phase 1: CS-Flow trained on normal images with the extractor frozen.

    Args:
        backbone: extractor backbone (``{name, pretrained, weights}``).
        layer: feature block (Lite0: ``blocks.5.3``; B5: ``blocks.5.8``).
        image_size: input side; must equal the DataModule's ``image_size``.
        hidden_channels: flow subnetwork width (paper 1024).
        kernel_sizes: one flow block per kernel (paper 3, 3, 3, 5).
        clamp: soft clamp of the log-scales (paper 3).
        cache_features: compute each training image's features once and reuse them.
        **kwargs: ``optimizer``, ``scheduler``, ``aupro_fpr_limit``, ``num_map_examples``.
    """

    method_name = "csflow"

    def __init__(self, backbone: BackboneSpec | dict | None = None, layer: str = "blocks.5.3", image_size: int = 768,
                 hidden_channels: int = 1024, kernel_sizes: list[int] | None = None, clamp: float = 3.0,
                 cache_features: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        spec = as_backbone_spec(backbone)
        kernel_sizes = list(kernel_sizes or [3, 3, 3, 5])
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        # Plain types only, so a phase-1 checkpoint loads with weights_only=True.
        self.hparams.update(backbone=dataclasses.asdict(spec), kernel_sizes=kernel_sizes)
        self.model = CSFlowModel(spec, layer, image_size, hidden_channels, kernel_sizes, clamp)
        self.model.extractor.set_trainable([])
        self.feature_cache = FeatureCache() if cache_features else None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        if self.feature_cache is not None:
            features = self.feature_cache.features(images, self.model.features)
        else:
            with torch.no_grad():
                features = self.model.features(images)
        return self.checked_total(self.nll_terms(features))


ARCHITECTURE_KEYS = ("backbone", "layer", "image_size", "hidden_channels", "kernel_sizes", "clamp")


def load_source_model(source_checkpoint: str | Path) -> CSFlowModel:
    """The CS-Flow model of a phase-1 (:class:`CSFlow`) checkpoint, rebuilt from its own hyperparameters."""
    path = Path(source_checkpoint).expanduser()
    checkpoint = load_torch_file(path, "source_checkpoint", "the last.ckpt of a phase-1 CS-Flow run "
                                 "(configs/csflow/source_*.yaml)")
    method = checkpoint.get("shiftad_method") if isinstance(checkpoint, dict) else None
    if method != CSFlow.__name__:
        raise ValueError(f"source_checkpoint {str(path)!r} was written by {method!r}; phase 2 needs a phase-1 "
                         f"{CSFlow.__name__!r} checkpoint")
    hparams = checkpoint["hyper_parameters"]
    architecture = {key: hparams[key] for key in ARCHITECTURE_KEYS}
    model = CSFlowModel(as_backbone_spec(architecture.pop("backbone")), **architecture)
    state = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()
             if key.startswith("model.")}
    model.load_state_dict(state)
    return model


class CSFlowAdaptation(CSFlowDetector):
    """Phase 2: adapt the first MBConv blocks of a trained CS-Flow's extractor to k target normals, flow frozen
    (paper 001); or, ShiftAD's variant, the flow itself from its source weights, extractor frozen.

    Args:
        source_checkpoint: ``last.ckpt`` of a phase-1 :class:`CSFlow` run (loaded with ``weights_only=True``).
        adapt_blocks: N, how many of the first MBConv blocks are updated (paper 001: 5).
        adapt_stem: also update the stem convolution and its BatchNorm.
        adapt_flow: also update the flow (with ``adapt_blocks: 0``, the flow alone: fine-tuned from its source
            weights on the shots, the extractor frozen).
        bn_policy: ``batch``: the adapted blocks' BatchNorm uses batch statistics while adapting (and
            updates its running statistics); ``frozen``: it keeps the source statistics.
        l2_sp: α of L2-SP, a pull of the adapted weights toward the source ones, α/2·Σ‖w − w_src‖² added to
            the NLL (0: the paper's phase 2).
        shot_views: ``flips``: each step shows every shot as one of its 4 flips, cycling with the step (the
            same at a resume); ``none``: as loaded.
        safety: at the end of the fit, keep the adapted blocks only if they separate the shots from
            pseudo-defective copies of them at least as well as the source blocks
            (``components.pseudo_defect_check``); otherwise the source blocks are restored before the last
            checkpoint is written. The decision is logged as ``adapt/kept``. Off, the check still runs and
            logs what it would have decided (the paper's phase 2 is measured that way), and the update stays.
        **kwargs: ``optimizer`` (e.g. Adam lr 1e-4), ``scheduler``, ``aupro_fpr_limit``, ``num_map_examples``.

    Steps are the Trainer's ``max_steps``; every step sees its k images at 3 scales.
    """

    method_name = "csflow_adapt"

    def __init__(self, source_checkpoint: str, adapt_blocks: int = 5, adapt_stem: bool = False,
                 adapt_flow: bool = False, bn_policy: BNPolicy = "batch", l2_sp: float = 0.0,
                 shot_views: Views = "none", safety: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if bn_policy not in ("batch", "frozen"):
            raise ValueError(f"bn_policy must be 'batch' or 'frozen', got {bn_policy!r}")
        if not (isinstance(l2_sp, int | float) and math.isfinite(l2_sp) and l2_sp >= 0):
            raise ValueError(f"l2_sp must be a finite number >= 0, got {l2_sp!r}")
        if shot_views not in VIEW_COUNTS:
            raise ValueError(f"shot_views must be one of {', '.join(VIEW_COUNTS)}, got {shot_views!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = load_source_model(source_checkpoint)
        self.adapted_modules = self.model.set_adaptable(adapt_blocks, adapt_stem, adapt_flow)
        self.bn_policy = bn_policy
        self.l2_sp, self.shot_views, self.safety = float(l2_sp), shot_views, safety
        # The adapted blocks' source state: L2-SP's anchor and the safety rule's fallback. Rebuilt from
        # source_checkpoint at every launch, so a resume has the same anchor and checkpoints stay small.
        self.source_state = {name: value.detach().clone() for name, value in self.adapted_state().items()}
        # Lightning keeps the modes modules have at fit start, so the BN policy applies from here on.
        self.train(self.training)

    def train(self, mode: bool = True) -> CSFlowAdaptation:
        super().train(mode)
        if self.bn_policy == "frozen":
            self.model.freeze_adapted_batchnorm()
        return self

    def adapted_state(self) -> dict[str, torch.Tensor]:
        """Parameters and BatchNorm statistics of the adapted modules, keyed as in the CS-Flow model."""
        return {f"{name}.{key}": value for name in self.adapted_modules
                for key, value in self.model.get_submodule(name).state_dict(keep_vars=True).items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        if self.shot_views == "flips":
            images = cycled_flips(images, self.global_step)
        terms = self.nll_terms(self.model.features(images))
        if self.l2_sp > 0:
            terms["l2_sp"] = self.l2_sp / 2 * sum(
                (value - self.source_state[name].to(value.device)).square().sum()
                for name, value in self.adapted_state().items() if isinstance(value, torch.nn.Parameter))
        return self.checked_total(terms)

    def on_train_epoch_end(self) -> None:
        # Runs before the checkpoint callbacks' epoch end, so the last checkpoint holds the decision. Not
        # `fit_loop.done`: reading it logs and updates the loop's progress counters, and it is also true when a
        # callback sets `should_stop`, after which a run may still be resumed.
        trainer = self.trainer
        final = (trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps) or (
            trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs)
        if final:
            self.apply_safety_rule(trainer.datamodule)

    @torch.no_grad()
    def apply_safety_rule(self, datamodule) -> bool:
        """Compares the adapted and the source blocks on the shots' pseudo-defect separation; restores the source
        blocks when the adapted ones separate worse (and ``safety`` is on). Returns whether the adaptation stays."""
        shots = target_shot_images(datamodule, "model.init_args.safety").to(self.device)
        adapted_state = {name: value.detach().clone() for name, value in self.adapted_state().items()}
        was_training = self.training
        self.eval()
        decision = self.pseudo_defect_verdict(
            shots, "flips", lambda updated: self.load_adapted_state(adapted_state if updated else self.source_state))
        if decision.kept or not self.safety:
            self.load_adapted_state(adapted_state)
        self.train(was_training)
        line, metrics = decision.summary(len(shots), self.safety)
        log.info(line)
        self.log_dict(metrics, rank_zero_only=True)
        return decision.kept or not self.safety

    def recalibrate_extractor(self, datamodule, images: torch.Tensor) -> tuple[bool, str, dict[str, float]]:
        raise ValueError("target_recalibration.extractor_statistics anchors the extractor to the images its flow was "
                         "fitted on, and phase 2 fits on the target shots: recalibrate the phase-1 checkpoint, or "
                         "set extractor_statistics false (flow-output standardisation) here")

    def load_adapted_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in self.adapted_state().items():
            value.data.copy_(state[name].to(value.device))
