"""Few-shot target recalibration: fitted source statistics re-estimated from k unlabelled target normals (and
their label-preserving views), with a label-free safety rule that keeps or declines the update.

A detector's per-position Gaussians N(μ_s(p), Σ_s(p)) (PaDiM) are the prior; the shots' embeddings at each
position are the evidence. Each position's Gaussian becomes the moments of a mixture of the source Gaussian,
weighted as ``prior_count`` embeddings, and the n = k·V shot embeddings there (V views per shot):

    μ = (n₀μ_s + n·x̄)/(n₀ + n),   Σ = (n₀Σ_s + S + n₀n/(n₀ + n)·(x̄ − μ_s)(x̄ − μ_s)ᵀ)/(n₀ + n),

S the shots' scatter about x̄. The mean moves toward the shots; the covariance keeps the source's shape and
widens along the source-to-target offset. The shots' weight grows with k; with none it is the source.

The safety rule refits the update without some of the shots (leave one shot out; at k = 1, half of its views)
and compares the held-out embeddings' mean Gaussian negative log-likelihood under the update and under the
source statistics. The NLL, unlike the Mahalanobis distance alone, also charges a covariance inflated to
swallow everything (its log-determinant). The update is kept only when it explains held-out shots better.
Only the shots' images are read, never a label.

With ``align_channels``, the source Gaussians are first moved into the shots' channel frame (each channel's mean
and spread over all positions), which is per-domain feature standardisation written into the Gaussians; ``auto``
lets the held-out check choose, per run, between the update with and without it.

A normalizing flow (CS-Flow) has no fitted statistics to move: it maps source features onto N(0, I). There the
same update acts behind the frozen flow: per scale and channel, the prior is the flow's N(0, 1), the evidence is
the shots' flow outputs z at every position of every view, and the scores read z standardised by the update,
(z − μ)/σ. The same held-out rule decides; the flow's log-determinant is common to both sides and cancels.

A network whose normalisation statistics were learned on the source (DenseHybrid trained end to end) gets the
update in its BatchNorms: AdaBN (``components.batchnorm_statistics``), each layer's running statistics being the
prior that its input over the shots' views moves, layer after layer, each layer kept or declined by the same rule
on its own held-out inputs. A frozen pretrained extractor (CS-Flow's, ``extractor_statistics``) gets the same
update relative to the source: the prior is each layer's input over the training images, and the layer's new
statistics normalise the shots as its own normalised those images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.modules.batchnorm import _BatchNorm

from datamodules.domain import ResolvedDomain, resolve_source, resolve_target
from lightning_modules.components.batchnorm_statistics import anchored_statistics, restorer
from lightning_modules.components.specs import spec_from

Views = Literal["none", "flips"]
VIEW_COUNTS = {"none": 1, "flips": 4}
SAFETY_POSITIONS = 256  # positions the safety rule scores (an evenly spaced subset)
#: positions of each view a BatchNorm's input statistics are estimated from (an evenly spaced subset beyond:
#: 64 x 64, the largest map of a 128 px image through a stride-2 stem)
BATCHNORM_POSITIONS = 4096


@dataclass
class RecalibrationSpec:
    """``target_recalibration:`` of a detector: how its statistics move to the target's k shots.

    Args:
        prior_count: weight of the source statistics, in embeddings per position (the shots count k·views).
        views: label-preserving views of each shot: ``none`` or ``flips`` (identity, left-right, up-down and
            both, i.e. a half-turn: a flipped normal image is still normal).
        safety: apply the safety rule (False: always keep the update; its figures are still logged).
        align_channels: before the shrinkage, move the source Gaussians into the shots' channel frame: each
            feature channel's mean and spread over all positions become the shots' (per-domain feature
            standardisation, folded into the Gaussians; PaDiM only). ``auto``: with and without, whichever
            explains the held-out shots better (the safety rule's own NLL), decided per run.
        extractor_statistics: CS-Flow only: first move the frozen extractor's BatchNorm statistics, per scale,
            so that each layer normalises the shots' views as it normalised the training images
            (``batchnorm_recalibration`` anchored to their input moments); kept only if the detector then
            separates the shots from pseudo-defective copies of them at least as well as before
            (``components.pseudo_defect_check``). Where that is declined, and at k = 1 under the safety rule, the
            flow's outputs are standardised instead.
    """

    prior_count: int = 64
    views: Views = "flips"
    safety: bool = True
    align_channels: bool | Literal["auto"] = False
    extractor_statistics: bool = False

    def __post_init__(self) -> None:
        if self.align_channels not in (True, False, "auto"):
            raise ValueError(f"target_recalibration.align_channels must be true, false or auto, got "
                             f"{self.align_channels!r}")
        if isinstance(self.prior_count, bool) or not isinstance(self.prior_count, int) or self.prior_count < 1:
            raise ValueError(f"target_recalibration.prior_count must be a whole number >= 1 (embeddings per "
                             f"position), got {self.prior_count!r}")
        if not isinstance(self.extractor_statistics, bool):
            raise ValueError(f"target_recalibration.extractor_statistics must be true or false, got "
                             f"{self.extractor_statistics!r}")
        if self.views not in VIEW_COUNTS:
            raise ValueError(f"target_recalibration.views must be one of {', '.join(VIEW_COUNTS)}, got "
                             f"{self.views!r}")


#: ``target_recalibration`` may be set at test/predict time where it acts then (as a whole and field by field).
RECALIBRATION_OPTIONS: dict[str, None] = {"target_recalibration": None, **{
    f"target_recalibration.{name}": None for name in RecalibrationSpec.__dataclass_fields__}}


def as_recalibration_spec(value: RecalibrationSpec | dict | None) -> RecalibrationSpec | None:
    """The spec from a dict (a checkpoint's hyperparameters, Python callers) or as given."""
    return None if value is None else spec_from(value, RecalibrationSpec, "target_recalibration")


class Gaussians(NamedTuple):
    """Per-position Gaussians, float64: mean [P, D], covariance [P, D, D] (without a detector's ε)."""

    mean: torch.Tensor
    covariance: torch.Tensor


class Moments(NamedTuple):
    """Per-position sums of n embeddings each, float64: n, Σx [P, D], Σxxᵀ [P, D, D]."""

    count: int
    feature_sum: torch.Tensor
    outer_sum: torch.Tensor

    @classmethod
    def of(cls, embeddings: torch.Tensor) -> Moments:
        """embeddings [n, P, D] -> their per-position sums."""
        x = embeddings.to(torch.float64).transpose(0, 1)  # [P, n, D]
        return cls(embeddings.shape[0], x.sum(1), x.transpose(1, 2) @ x)

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.feature_sum + other.feature_sum,
                       self.outer_sum + other.outer_sum)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.count - other.count, self.feature_sum - other.feature_sum,
                       self.outer_sum - other.outer_sum)


class SafetyVerdict(NamedTuple):
    """The safety rule's figures: mean held-out NLL per position under the update and under the source."""

    kept: bool
    adapted_nll: float
    source_nll: float
    held_out: str  # what was held out: "shots" or "views"
    aligned: bool = False  # whether the update moves the Gaussians into the shots' channel frame first


def label_preserving_views(images: torch.Tensor, views: Views) -> torch.Tensor:
    """[B, C, H, W] -> [V·B, C, H, W], view-major (view v of image b at v·B + b)."""
    if views == "flips":
        return torch.cat([images, images.flip(-1), images.flip(-2), images.flip(-2, -1)])
    return images


def cycled_flips(images: torch.Tensor, step: int) -> torch.Tensor:
    """Image b of a batch at step s shown as flip (s + b) mod 4, in ``label_preserving_views``' order."""
    batch = len(images)
    choice = (step + torch.arange(batch, device=images.device)) % VIEW_COUNTS["flips"]
    return label_preserving_views(images, "flips").view(-1, *images.shape)[choice, torch.arange(batch)]


def shrunk(prior: Gaussians, target: Moments, prior_count: int) -> Gaussians:
    """Moments of the mixture of the prior Gaussians (weight ``prior_count``) and the target's embeddings."""
    n0, n = float(prior_count), float(target.count)
    total = n0 + n
    target_mean = target.feature_sum / n
    offset = (target_mean - prior.mean)[:, :, None]
    mean = (n0 * prior.mean + n * target_mean) / total
    # In place on one [P, D, D] buffer: S = Σxxᵀ − n·x̄x̄ᵀ, + n₀Σ', + n₀n/(n₀ + n)·δδᵀ, / (n₀ + n).
    covariance = torch.baddbmm(target.outer_sum, target_mean[:, :, None], target_mean[:, None, :], alpha=-n)
    covariance.add_(prior.covariance, alpha=n0)
    covariance.baddbmm_(offset, offset.transpose(1, 2), alpha=n0 * n / total)
    return Gaussians(mean, covariance.div_(total))


def channel_aligned(source: Gaussians, target: Moments) -> Gaussians:
    """The source Gaussians in the target's channel frame. With a channel's mean m and spread s over all positions
    (source: of the Gaussians' mixture; target: of the shots), x ↦ m_t + (x − m_s)·s_t/s_s maps source features
    onto the target's; applied to the Gaussians, μ' = m_t + (μ − m_s)·r and Σ' = diag(r)·Σ·diag(r), r = s_t/s_s.
    Scoring a target feature under them equals scoring its standardised copy under the source Gaussians."""
    samples = target.count * target.feature_sum.shape[0]
    target_mean = target.feature_sum.sum(0) / samples
    target_var = target.outer_sum.diagonal(dim1=-2, dim2=-1).sum(0) / samples - target_mean.square()
    source_mean = source.mean.mean(0)
    source_var = (source.covariance.diagonal(dim1=-2, dim2=-1) + source.mean.square()).mean(0) - source_mean.square()
    tiny = torch.finfo(torch.float64).tiny
    ratio = (target_var.clamp_min(tiny) / source_var.clamp_min(tiny)).sqrt()
    return Gaussians(target_mean + (source.mean - source_mean) * ratio,
                     source.covariance * ratio[:, None] * ratio[None, :])


def recalibrated(source: Gaussians, target: Moments, spec: RecalibrationSpec) -> Gaussians:
    """The update of the source Gaussians from the target shots' moments (see the module docstring)."""
    if spec.align_channels == "auto":
        raise ValueError("align_channels auto is decided by safety_check: pass its verdict's choice (aligned)")
    prior = channel_aligned(source, target) if spec.align_channels else source
    return shrunk(prior, target, spec.prior_count)


def mean_nll(gaussians: Gaussians, embeddings: torch.Tensor, eps: float) -> float:
    """Mean negative log-likelihood per position of embeddings [n, P, D] under N(μ, Σ + ε·I)."""
    dim = gaussians.mean.shape[-1]
    if dim == 1:  # one channel per position (BatchNorms, flow outputs): no factorisation needed
        var = gaussians.covariance[:, 0, 0] + eps  # [P]
        squared = (embeddings.to(torch.float64)[..., 0] - gaussians.mean[:, 0]).square() / var  # [n, P]
        return float(0.5 * (squared + var.log() + math.log(2 * math.pi)).mean())
    covariance = gaussians.covariance + eps * torch.eye(dim, dtype=torch.float64, device=gaussians.mean.device)
    cholesky = torch.linalg.cholesky(covariance)
    centred = embeddings.to(torch.float64).permute(1, 2, 0) - gaussians.mean[:, :, None]  # [P, D, n]
    squared = torch.linalg.solve_triangular(cholesky, centred, upper=False).square().sum(1)  # [P, n]
    log_det = 2 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [P]
    return float(0.5 * (squared + log_det[:, None] + dim * math.log(2 * math.pi)).mean())


def evenly_spaced(count: int, most: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices of at most ``most`` of ``count`` items, evenly spaced, first and last included."""
    return torch.linspace(0, count - 1, min(count, most), device=device).round().long().unique()


def safety_check(source: Gaussians, shots: torch.Tensor, spec: RecalibrationSpec, eps: float) -> SafetyVerdict:
    """shots [k, V, P, D]: each shot's view embeddings. Leave one shot out (k >= 2) or, at k = 1, refit on one
    half of the views and score the other half, both ways; keep when the update's mean held-out NLL is lower
    than the source's. Per-position Gaussians are independent, so an evenly spaced subset of at most
    ``SAFETY_POSITIONS`` positions estimates the mean NLL at a cost that does not grow with the image size."""
    k, views, positions = shots.shape[:3]
    if k == 1 and views == 1:
        raise ValueError("the safety rule needs two shots or two views of one: set target_recalibration.views "
                         "to flips for k = 1, or safety false")
    subset = evenly_spaced(positions, SAFETY_POSITIONS)
    source = Gaussians(source.mean[subset], source.covariance[subset])
    shots = shots[:, :, subset.to(shots.device)]
    if k >= 2:
        held_out_sets = [shots[i] for i in range(k)]
        per_shot = [Moments.of(held) for held in held_out_sets]
        everything = sum(per_shot[1:], per_shot[0])
        fits = [everything - moments for moments in per_shot]
        kind = "shots"
    else:
        half = views // 2
        held_out_sets = [shots[0, half:], shots[0, :half]]
        fits = [Moments.of(shots[0, :half]), Moments.of(shots[0, half:])]
        kind = "views"
    held_out_nll = {}
    for aligned in ((False, True) if spec.align_channels == "auto" else (bool(spec.align_channels),)):
        variant = replace(spec, align_channels=aligned)
        folds = [mean_nll(recalibrated(source, fit, variant), held, eps)
                 for fit, held in zip(fits, held_out_sets, strict=True)]
        held_out_nll[aligned] = sum(folds) / len(folds)
    aligned = min(held_out_nll, key=held_out_nll.get)
    baseline = mean_nll(source, shots.flatten(0, 1), eps)  # every held-out set once: the mean over the folds
    return SafetyVerdict(held_out_nll[aligned] < baseline, held_out_nll[aligned], baseline, kind, aligned)


class Standardisation(NamedTuple):
    """Per-scale flow-output standardisation z -> (z − mean)/std: mean and std [C] of each scale, float32."""

    mean: list[torch.Tensor]
    std: list[torch.Tensor]


def channel_update(samples: torch.Tensor, prior_mean: torch.Tensor, prior_var: torch.Tensor,
                   spec: RecalibrationSpec, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, SafetyVerdict]:
    """samples [k, V, C, ...]: a per-channel quantity at every position of the shots' views -> each channel's
    N(prior_mean, prior_var) moved toward the shots as (mean, variance) [C] (float64), the prior weighted as
    ``prior_count`` images (prior_count·positions samples), and the safety rule's verdict on the move, its NLLs
    with the variances + ``eps`` (what a BatchNorm divides by)."""
    k, views, channels = samples.shape[:3]
    positions = samples[0, 0, 0].numel()
    # [k, V·positions, C, 1]: every position of every view is one sample of each channel, view-major.
    x = samples.to(torch.float64).reshape(k, views, channels, positions).transpose(2, 3)
    x = x.reshape(k, views * positions, channels, 1)
    prior = Gaussians(prior_mean.to(torch.float64).reshape(channels, 1),
                      prior_var.to(torch.float64).reshape(channels, 1, 1))
    spec = replace(spec, prior_count=spec.prior_count * positions)
    verdict = safety_check(prior, x, spec, eps)
    update = recalibrated(prior, Moments.of(x.flatten(0, 1)), spec)
    return update.mean[:, 0], update.covariance[:, 0, 0], verdict


def pooled_verdict(verdicts: list[SafetyVerdict], weights: list[float]) -> SafetyVerdict:
    """One verdict from parts decided together (kept when the weighted held-out NLL is lower)."""
    total = sum(weights)
    adapted = sum(w * v.adapted_nll for w, v in zip(weights, verdicts, strict=True)) / total
    source = sum(w * v.source_nll for w, v in zip(weights, verdicts, strict=True)) / total
    return SafetyVerdict(adapted < source, adapted, source, verdicts[0].held_out)


def flow_output_recalibration(shots_z: list[torch.Tensor], spec: RecalibrationSpec
                              ) -> tuple[Standardisation, SafetyVerdict]:
    """shots_z: per scale, the flow outputs of the shots' views [k, V, C, h, w] -> the standardisation that
    moves each channel's N(0, 1) toward the shots (the prior weighted as ``prior_count`` images), and the safety
    rule's verdict on it. The verdict pools the scales, each weighted by its positions (its share of the image
    score's elements): the standardisation is kept or declined as a whole."""
    standardisation, verdicts, weights = Standardisation([], []), [], []
    for z in shots_z:
        channels = z.shape[2]
        prior = torch.zeros(channels, dtype=torch.float64, device=z.device)
        mean, var, verdict = channel_update(z, prior, prior + 1, spec)
        verdicts.append(verdict)
        weights.append(z.shape[-2] * z.shape[-1])
        standardisation.mean.append(mean.float())
        standardisation.std.append(var.sqrt().float())
    return standardisation, pooled_verdict(verdicts, weights)


class LayerVerdicts(NamedTuple):
    """Per re-estimated BatchNorm, in forward order: its name, the safety rule's verdict and whether its update
    was applied (kept, or the rule is off)."""

    names: list[str]
    verdicts: list[SafetyVerdict]
    applied: list[bool]

    def summary(self) -> SafetyVerdict:
        """The run's verdict: kept when any layer's update was applied; its NLLs are the layers' means, the
        updated side with what each layer now uses (its update where applied, else its source statistics)."""
        used = [v.adapted_nll if applied else v.source_nll for v, applied in zip(self.verdicts, self.applied, strict=True)]
        return SafetyVerdict(any(self.applied), sum(used) / len(used),
                             sum(v.source_nll for v in self.verdicts) / len(self.verdicts), self.verdicts[0].held_out)

    @property
    def kept_share(self) -> float:
        return sum(self.applied) / len(self.applied)


@torch.no_grad()
def batchnorm_recalibration(forward: Callable[[torch.Tensor], object], layers: list[tuple[str, _BatchNorm]],
                            images: torch.Tensor, spec: RecalibrationSpec,
                            source_moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                            ) -> LayerVerdicts:
    """AdaBN from k unlabelled shots, shrunk toward the source and checked layer by layer. ``layers`` are the
    BatchNorms of the network ``forward`` runs (in eval mode). In the order the forward pass reaches them, each
    layer's input over the shots' views (the earlier layers already using what was decided for them) is the
    evidence; the source's moments of that input, weighted as ``prior_count`` images, are the prior: the layer's
    running statistics when they were learned on the source, else ``source_moments[name]`` (a frozen pretrained
    layer: its input over the source images). The safety rule keeps or declines each layer's update on its own,
    on the held-out shots' inputs to that layer. A kept update is written into the layer's running statistics,
    anchored to the source (``anchored_statistics``): the layer then normalises the shots' inputs as it
    normalised the source's, which for statistics learned on the source is plain AdaBN.

    The k·V views go through the network as one batch, and each layer decides in a forward pre-hook, before it
    normalises its input: one pass does what a pass per layer, stopped at it, would."""
    if not layers:
        raise ValueError("target_recalibration re-estimates BatchNorm statistics learned in training, and this "
                         "network has none (every BatchNorm is frozen)")
    names, verdicts, applied = [], [], []

    def update(name: str, layer: _BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        if name in names:  # a layer called twice keeps its first decision
            return
        values = inputs[0].reshape(*inputs[0].shape[:2], -1)  # [V·k, C, positions]
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"target recalibration: the target shots' input to BatchNorm {name!r} is not "
                                     f"finite (NaN or Inf); every BatchNorm keeps the statistics it had")
        if values.shape[-1] > BATCHNORM_POSITIONS:
            values = values[:, :, evenly_spaced(values.shape[-1], BATCHNORM_POSITIONS, values.device)]
        views = values.reshape(VIEW_COUNTS[spec.views], len(images), *values.shape[1:]).transpose(0, 1)
        source = (layer.running_mean, layer.running_var) if source_moments is None else source_moments[name]
        mean, var, verdict = channel_update(views, *source, spec, layer.eps)
        apply = verdict.kept or not spec.safety
        if apply:
            if source_moments is not None:
                mean, var = anchored_statistics(layer, source, (mean, var))
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        names.append(name)
        verdicts.append(verdict)
        applied.append(apply)

    restore = restorer(layers)
    handles = [layer.register_forward_pre_hook(lambda _m, inputs, name=name, layer=layer: update(name, layer, inputs))
               for name, layer in layers]
    try:
        forward(label_preserving_views(images, spec.views))
    except BaseException:  # a half-updated network would be neither the source's nor the update
        restore()
        raise
    finally:
        for handle in handles:
            handle.remove()
    if not names:
        raise RuntimeError(f"the forward pass reached none of the {len(layers)} BatchNorms to recalibrate")
    return LayerVerdicts(names, verdicts, applied)


def views_per_shot(forward: Callable[[torch.Tensor], list[torch.Tensor]], images: torch.Tensor, views: Views,
                   batch_size: int = 32) -> list[torch.Tensor]:
    """images [k, 3, H, W] -> for each output of ``forward`` (a list of [B, ...] tensors), the outputs of the
    shots' views [k, V, ...], computed ``batch_size`` views at a time."""
    chunks = [forward(chunk) for chunk in label_preserving_views(images, views).split(batch_size)]  # view-major
    return [torch.cat(output).reshape(VIEW_COUNTS[views], len(images), *output[0].shape[1:]).transpose(0, 1)
            for output in zip(*chunks, strict=True)]


def embed_views(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, views: Views) -> torch.Tensor:
    """images [k, 3, H, W] -> per-shot view embeddings [k, V, P, D] (float32), ``embed`` giving [B, D, h, w]."""
    (maps,) = views_per_shot(lambda chunk: [embed(chunk)], images, views)
    return maps.flatten(3).transpose(2, 3)


def verdict_summary(verdict: SafetyVerdict, kept: bool, spec: RecalibrationSpec, shots: int) -> tuple[str, dict]:
    """The decision as a log line and as the ``adapt/`` metrics a run logs once."""
    line = (f"target recalibration from {shots} shots x {VIEW_COUNTS[spec.views]} views: "
            f"{'kept' if kept else 'declined, source kept'} (held-out {verdict.held_out} NLL: updated "
            f"{verdict.adapted_nll:.3f}, source {verdict.source_nll:.3f}{'' if spec.safety else '; safety rule off'}"
            f"{'; channels aligned' if verdict.aligned else ''})")
    metrics = {"adapt/kept": float(kept), "adapt/heldout_nll_updated": verdict.adapted_nll,
               "adapt/heldout_nll_source": verdict.source_nll}
    return line, {**metrics, "adapt/aligned": float(verdict.aligned)} if spec.align_channels else metrics


def target_shot_images(datamodule, key: str) -> torch.Tensor:
    """The DataModule's k unlabelled target shots as images [k, 3, H, W]: only each item's ``image`` is read,
    never a label or mask. ``key`` (the option that asked for them) is named in the errors."""
    loader_of = getattr(datamodule, "target_train_dataloader", None)
    if loader_of is None:
        raise ValueError(f"{key} needs target normal shots, but {type(datamodule).__name__} has no "
                         f"target_train_dataloader(); use datamodules.OneClassDataModule with "
                         f"data.init_args.target_shots k")
    try:
        dataset = loader_of().dataset
    except ValueError as error:
        raise ValueError(f"{key}: {error} (data.init_args.target_shots)") from error
    if len(dataset) == 0:
        raise ValueError(f"{key}: the DataModule's target shots are empty (data.init_args.target_shots)")
    return torch.stack([dataset[index]["image"] for index in range(len(dataset))])


#: training images an extractor's source input moments are measured on (an evenly spaced subset beyond)
SOURCE_MOMENT_IMAGES = 64


#: the DataModule settings that decide which images its train split reads: always, and per ``train_on`` part
TRAIN_SPLIT_KEYS = ("train_on",)
TRAIN_SPLIT_KEYS_OF = {"source": ("source",), "target": ("target",), "target_shots": ("target", "target_shots", "fold")}


class SettingChange(NamedTuple):
    """One train-split setting (``source.category``, ``fold``) that differs between the fit and this run."""

    name: str
    fitted: object
    current: object

    @property
    def folder_only(self) -> bool:
        """A domain's ``root``: the same images may have moved to another folder or machine."""
        return self.name.endswith(".root")

    def __str__(self) -> str:
        return f"{self.name}: {self.fitted!r} -> {self.current!r}"


def _domains(hparams: dict, whose: str) -> dict[str, ResolvedDomain]:
    """A OneClass DataModule's source and target as it resolves them (no image is read); none for another.
    ``whose`` hyperparameters they are is named in the errors."""
    if not isinstance(hparams.get("source"), dict):
        return {}
    try:
        source = resolve_source(hparams["source"])
        return {"source": source, "target": resolve_target(hparams.get("target"), source)}
    except ValueError as error:
        raise ValueError(f"{whose} data.init_args: {error}") from error


def _shown(given: dict | None, domain: ResolvedDomain, field: str) -> object:
    """A domain field as the config gave it, or as resolved where it was left unset (inherited from the source, or
    the embedded build's folder); no shift is shown as given (``None``)."""
    value = (given or {}).get(field)
    if value is not None or field == "shift":
        return value
    categories = domain.categories[0] if len(domain.categories) == 1 else list(domain.categories)
    return {"dataset": domain.dataset, "root": str(domain.root), "category": categories}[field]


def train_split_mismatch(fitted: dict, current: dict) -> list[SettingChange]:
    """The train-split settings (``data.init_args``) in which ``current`` differs from ``fitted``; both are
    DataModule hyperparameters (a checkpoint's ``datamodule_hyper_parameters``). A domain is compared field by
    field as resolved (a target's unset fields are the source's)."""
    keys = [*TRAIN_SPLIT_KEYS, *(key for part in str(fitted.get("train_on", "")).split("+")
                                 for key in TRAIN_SPLIT_KEYS_OF.get(part, ()))]
    was_domains, now_domains = _domains(fitted, "the checkpoint's fit"), _domains(current, "this run's")
    changes = []
    for key in dict.fromkeys(keys):
        was, now = fitted.get(key), current.get(key)
        if key in was_domains and key in now_domains:
            was_domain, now_domain = was_domains[key], now_domains[key]
            changes += [SettingChange(f"{key}.{field}", _shown(was, was_domain, field), _shown(now, now_domain, field))
                        for field in was_domain.changed_fields(now_domain)]
        elif was != now:
            changes.append(SettingChange(key, was, now))
    return changes


def training_images(datamodule, key: str, most: int = SOURCE_MOMENT_IMAGES,
                    fitted_data: dict | None = None) -> torch.Tensor:
    """At most ``most`` evenly spaced images [n, 3, H, W] of the DataModule's train split, the normals the detector
    was fitted on; only each item's ``image`` is read. ``fitted_data``: the DataModule hyperparameters of the fit
    (from its checkpoint), refused when the train split would read other images. ``key`` is named in the
    errors."""
    current = getattr(datamodule, "hparams", None)
    if fitted_data is not None and current is not None:
        changes = train_split_mismatch(fitted_data, dict(current))
        refused = [str(change) for change in changes if not change.folder_only]
        if refused:
            raise ValueError(f"{key} measures the source statistics on the images the detector was fitted on, but "
                             f"this run's DataModule reads other training images than the checkpoint's fit "
                             f"(data.init_args {'; '.join(refused)}); set them as in the fit")
        if changes:
            rank_zero_warn(f"{key}: the training images are read from another folder than in the checkpoint's fit "
                           f"(data.init_args {'; '.join(map(str, changes))}); the source statistics are right only "
                           f"if they are the same images")
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is None:
        raise ValueError(f"{key} needs the images the detector was fitted on, but {type(datamodule).__name__} has "
                         f"no train split; use datamodules.OneClassDataModule with data.init_args.train_on as in "
                         f"the fit")
    if len(dataset) < 2:
        raise ValueError(f"{key}: the DataModule's train split has {len(dataset)} image(s); the source statistics "
                         f"need at least 2 (data.init_args.train_on as in the fit)")
    return torch.stack([dataset[int(index)]["image"] for index in evenly_spaced(len(dataset), most)])
