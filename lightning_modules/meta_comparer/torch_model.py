"""Co-attention meta-comparer (paper 002): learns to compare query patches with normal reference patches.

- phi: backbone stages -> bi-directional feature pyramid -> L patch-feature maps (section 2.1).
- Co-attention: A_i = (cos(P_q q_i^j, P_r r_i^k) + 1) / 2 in [0, 1]^{N_Q x N_R}; guidance a_i^j = max_k a_i^jk.
- Meta-comparer (eq. 1): s_i^j = max_k sigmoid(MLP([q_i^j, r_i^k])). The MLP's first layer is linear, so
  W [q; r] + b = (W_q q + b) + W_r r: both halves are computed once per patch and broadcast over the
  pairs, and the pairs are processed in chunks of references with a running max.
- Inference: image score = max over all patches and scales (eq. 5); pixel score = max over the patches
  that contain the pixel (eq. 6).

Scores are kept as logits (sigmoid is monotone): the losses use BCE-with-logits and the test scores
never saturate at 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor
from lightning_modules.components.feature_pyramid import BiFeaturePyramid

#: Pair elements [B, N_Q, chunk, hidden] of one chunk when scoring without gradients on CPU: 1 MiB of fp32
#: stays in cache, where the add, ReLU and head run about ten times faster than on a large chunk streamed
#: through memory (a 100-image reference bank at 128 px: 7 million pairs per test image).
CPU_INFERENCE_PAIR_ELEMENTS = 2**18


class MultiScalePatchEncoder(nn.Module):
    """phi: images [B, 3, H, W] in [0, 1] -> L patch-feature maps [B, D, h_i, w_i], finest first.

    A patch is the ``patch_size`` x ``patch_size`` neighbourhood of a pyramid position; its feature is the
    mean over that neighbourhood, so patches overlap by ``patch_size - 1`` positions.
    """

    def __init__(self, backbone: BackboneSpec, layers: list[str | int], channels: int, pyramid_passes: int,
                 patch_size: int, trainable: list[str] | None) -> None:
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be an odd number of pyramid positions, got {patch_size}")
        self.extractor = FeatureExtractor(backbone, layers, trainable=trainable)
        self.pyramid = BiFeaturePyramid(self.extractor.out_channels, channels, pyramid_passes)
        self.patch_size = patch_size

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        stages = self.extractor(images)
        levels = self.pyramid([stages[name] for name in self.extractor.layers])
        return [F.avg_pool2d(x, self.patch_size, stride=1, padding=self.patch_size // 2, count_include_pad=False)
                for x in levels]


class CoAttention(nn.Module):
    """Projects query and reference patches into a shared space; A = (cosine similarity + 1) / 2."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.query_projection = nn.Linear(channels, dim)
        self.reference_projection = nn.Linear(channels, dim)

    def forward(self, queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """queries [B, N_Q, D], references [B, N_R, D] -> A [B, N_Q, N_R] in [0, 1]."""
        q = F.normalize(self.query_projection(queries).float(), dim=-1)
        r = F.normalize(self.reference_projection(references).float(), dim=-1)
        return ((q @ r.transpose(1, 2) + 1) / 2).clamp(0, 1)


class FactorisedComparer(nn.Module):
    """MLP([q, r]) -> logit, with the first layer split as W_q q + b and W_r r.

    Args:
        channels: patch feature size D.
        hidden: hidden layer sizes (ReLU after each); the last layer gives one logit.
        max_pair_elements: the largest [B, N_Q, chunk, hidden] pair activation built at once; more
            references are processed in chunks (recomputed in the backward pass when training). Without
            gradients on CPU, chunks hold at most ``CPU_INFERENCE_PAIR_ELEMENTS``.
        reference_pooling: ``max`` over the references as in eq. 1, or ``min`` (a query patch is as normal
            as its best-matching reference patch; an ablation, not the paper).
    """

    def __init__(self, channels: int, hidden: list[int], max_pair_elements: int = 2**25,
                 reference_pooling: str = "max") -> None:
        super().__init__()
        if not hidden or min(hidden) < 1:
            raise ValueError(f"comparer hidden sizes must be a non-empty list of positive ints, got {hidden}")
        if reference_pooling not in ("max", "min"):
            raise ValueError(f"reference_pooling must be 'max' (eq. 1) or 'min', got {reference_pooling!r}")
        self.reference_pooling = reference_pooling
        self.query_in = nn.Linear(channels, hidden[0])  # W_q and the bias of the first layer
        self.reference_in = nn.Linear(channels, hidden[0], bias=False)  # W_r
        layers: list[nn.Module] = []
        for width_in, width_out in zip(hidden, [*hidden[1:], 1], strict=True):
            layers += [nn.ReLU(inplace=True), nn.Linear(width_in, width_out)]  # on fresh tensors only
        self.pair_head = nn.Sequential(*layers)
        self.max_pair_elements = max_pair_elements

    def pair_logits(self, query_hidden: torch.Tensor, reference_hidden: torch.Tensor) -> torch.Tensor:
        """[B, N_Q, H] and [B or 1, N, H] first-layer halves -> logits of every pair [B, N_Q, N]."""
        return self.pair_head(query_hidden[:, :, None] + reference_hidden[:, None]).squeeze(-1)

    def _chunk_pool(self, query_hidden: torch.Tensor, reference_hidden: torch.Tensor) -> torch.Tensor:
        logits = self.pair_logits(query_hidden, reference_hidden)
        return logits.amax(2) if self.reference_pooling == "max" else logits.amin(2)

    def pooled_logits(self, query_hidden: torch.Tensor, reference_hidden: torch.Tensor) -> torch.Tensor:
        """Eq. 1 as logits: max_k MLP([q^j, r^k]) -> [B, N_Q], over reference chunks with a running max
        (running min with ``reference_pooling="min"``)."""
        batch, num_queries, width = query_hidden.shape
        recompute = torch.is_grad_enabled() and (query_hidden.requires_grad or reference_hidden.requires_grad)
        limit = self.max_pair_elements
        if not recompute and query_hidden.device.type == "cpu":
            limit = min(limit, CPU_INFERENCE_PAIR_ELEMENTS)
        chunk = max(1, limit // (batch * num_queries * width))
        num_references = reference_hidden.shape[1]
        if chunk >= num_references:
            return self._chunk_pool(query_hidden, reference_hidden)
        combine = torch.maximum if self.reference_pooling == "max" else torch.minimum
        best = None
        for start in range(0, num_references, chunk):
            part = reference_hidden[:, start:start + chunk]
            if recompute:
                pooled = checkpoint(self._chunk_pool, query_hidden, part, use_reentrant=False)
            else:
                pooled = self._chunk_pool(query_hidden, part)
            best = pooled if best is None else combine(best, pooled)
        return best

    def forward(self, queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """queries [B, N_Q, D], references [B or 1, N_R, D] -> max_k logits [B, N_Q]."""
        return self.pooled_logits(self.query_in(queries), self.reference_in(references))


@dataclass
class EpisodeOutput:
    """Per scale: comparer logits of s_i^j [B, N_Q], co-attention A_i [B, N_Q, N_R], guidance a_i^j [B, N_Q]."""

    patch_logits: list[torch.Tensor]
    attention: list[torch.Tensor]
    guidance: list[torch.Tensor]


def _flat_patches(maps: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B, h*w, D]."""
    return maps.flatten(2).transpose(1, 2)


def _sample(patches: torch.Tensor, count: int | None) -> torch.Tensor:
    """``count`` patches per sample drawn without replacement ([B, P, D] -> [B, count, D]); all if None."""
    batch, available, _ = patches.shape
    if count is None or count >= available:
        return patches
    picks = torch.rand(batch, available, device=patches.device).argsort(1)[:, :count]
    return patches.gather(1, picks[..., None].expand(-1, -1, patches.shape[2]))


class MetaComparerModel(nn.Module):
    """Feature extractor phi, co-attention and meta-comparer.

    Args:
        backbone: the shared backbone spec (ResNet-18 in the paper).
        layers: backbone stages feeding the pyramid, finest first (one per scale; L = len(layers)).
        backbone_trainable: backbone module prefixes to fine-tune (``["*"]`` = all; default frozen).
        channels: pyramid / patch feature size D.
        pyramid_passes: top-down + bottom-up passes of the pyramid.
        patch_size: patch side in pyramid positions (odd).
        attention_dim: size of the co-attention's shared space.
        comparer_hidden: hidden sizes of the comparer MLP.
        num_query_patches: N_Q patches sampled per query image and scale in training (None = all).
        num_reference_patches: N_R patches sampled per scale from the query's reference images (None = all).
        max_pair_elements, reference_pooling: see ``FactorisedComparer``.
    """

    def __init__(self, backbone: BackboneSpec, layers: list[str | int], backbone_trainable: list[str] | None = None,
                 channels: int = 64, pyramid_passes: int = 1, patch_size: int = 3, attention_dim: int = 64,
                 comparer_hidden: list[int] | None = None, num_query_patches: int | None = 256,
                 num_reference_patches: int | None = 256, max_pair_elements: int = 2**25,
                 reference_pooling: str = "max") -> None:
        super().__init__()
        for name, value in (("num_query_patches", num_query_patches), ("num_reference_patches", num_reference_patches)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive int or None (all patches), got {value}")
        self.encoder = MultiScalePatchEncoder(backbone, layers, channels, pyramid_passes, patch_size, backbone_trainable)
        self.co_attention = CoAttention(channels, attention_dim)
        self.comparer = FactorisedComparer(channels, list(comparer_hidden or [64]), max_pair_elements,
                                           reference_pooling)
        self.num_query_patches = num_query_patches
        self.num_reference_patches = num_reference_patches

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def episode(self, queries: torch.Tensor, references: torch.Tensor) -> EpisodeOutput:
        """Training / validation forward. queries [B, 3, H, W]; references [B, R, 3, H, W] normals of the
        query's domain. Samples N_Q query and N_R reference patches per scale."""
        if references.ndim != 5 or references.shape[0] != queries.shape[0]:
            raise ValueError(f"references must be [B, R, 3, H, W] with B = {queries.shape[0]}, "
                             f"got {tuple(references.shape)}")
        batch, num_refs = references.shape[:2]
        maps = self.encoder(torch.cat([queries, references.flatten(0, 1)]))
        output = EpisodeOutput([], [], [])
        for level in maps:
            query_patches = _sample(_flat_patches(level[:batch]), self.num_query_patches)
            # Every reference image of a query pools its patches into one set R_i.
            reference_patches = _flat_patches(level[batch:]).reshape(batch, -1, level.shape[1])
            reference_patches = _sample(reference_patches, self.num_reference_patches)
            attention = self.co_attention(query_patches, reference_patches)
            output.patch_logits.append(self.comparer(query_patches, reference_patches))
            output.attention.append(attention)
            output.guidance.append(attention.amax(2))
        return output

    @torch.no_grad()
    def reference_bank(self, references: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
        """Target normals [N, 3, H, W] -> per scale W_r r of every patch of every reference [1, N h_i w_i, hidden].

        Like the k-NN and PaDiM baselines, the comparer sees every reference patch; ``patch_score_maps``
        scores against the whole bank in chunks of ``max_pair_elements``, so memory stays bounded.
        """
        levels: list[list[torch.Tensor]] = []
        for start in range(0, references.shape[0], batch_size):
            maps = self.encoder(references[start:start + batch_size])
            if not levels:
                levels = [[] for _ in maps]
            for store, level in zip(levels, maps, strict=True):
                store.append(_flat_patches(level).reshape(-1, level.shape[1]))
        return [self.comparer.reference_in(torch.cat(store))[None] for store in levels]

    def patch_score_maps(self, queries: torch.Tensor, bank: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits of s_i^j for every query patch against the whole reference bank: per scale [B, h_i, w_i]."""
        maps = self.encoder(queries)
        if len(maps) != len(bank):
            raise ValueError(f"the reference bank has {len(bank)} scales, the model {len(maps)}")
        scores = []
        for level, reference_hidden in zip(maps, bank, strict=True):
            query_hidden = self.comparer.query_in(_flat_patches(level))
            logits = self.comparer.pooled_logits(query_hidden, reference_hidden)
            scores.append(logits.reshape(level.shape[0], *level.shape[-2:]))
        return scores

    def anomaly_map(self, patch_scores: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """Eq. 6: each pixel gets the max score of every patch, at every scale, that contains it -> [B, H, W].

        A patch covers ``patch_size`` x ``patch_size`` pyramid cells, so at one scale the max over the
        patches containing a cell is a max-pool of that size; the cell then covers its stride of pixels.
        """
        per_scale = []
        for scores in patch_scores:
            covering = F.max_pool2d(scores[:, None].float(), self.patch_size, stride=1, padding=self.patch_size // 2)
            per_scale.append(F.interpolate(covering, size=image_size, mode="nearest")[:, 0])
        return torch.stack(per_scale).amax(0)

    def forward(self, queries: torch.Tensor, bank: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: (image scores [B] (eq. 5), anomaly maps [B, H, W] (eq. 6)), both as logits."""
        patch_scores = self.patch_score_maps(queries, bank)
        image_scores = torch.stack([s.flatten(1).amax(1) for s in patch_scores]).amax(0).float()
        return image_scores, self.anomaly_map(patch_scores, tuple(queries.shape[-2:]))
