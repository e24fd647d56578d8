"""The three training objectives of the meta-comparer (paper 002, equations 2-4).

Every term is a mean over the batch and a sum over the L scales. Inputs may be bfloat16 under autocast;
the losses are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Keeps log() finite when a normalised similarity reaches exactly 0 or 1.
ATTENTION_EPS = 1e-6


def classification_loss(patch_logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """L_cls (eq. 2): BCE of the image label against max_j s_i^j at every scale i.

    patch_logits: per scale [B, N_Q], the logit of s_i^j (sigmoid is monotone, so the max of the logits is
    the logit of the max). labels: [B], 1 = abnormal.
    """
    labels = labels.float()
    return sum(F.binary_cross_entropy_with_logits(logits.float().amax(1), labels) for logits in patch_logits)


def attention_loss(attention: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """L_att (eq. 3): -[y log(1 - min_jk a_i^jk) + (1 - y) log(min_jk a_i^jk)] at every scale i.

    attention: per scale [B, N_Q, N_R], co-attention in [0, 1]. The least similar query-reference pair is
    pushed towards 0 for abnormal queries and towards 1 for normal ones.
    """
    labels = labels.float()
    total = 0.0
    for matrix in attention:
        least = matrix.float().flatten(1).amin(1).clamp(ATTENTION_EPS, 1 - ATTENTION_EPS)
        total = total + (-(labels * torch.log1p(-least) + (1 - labels) * torch.log(least))).mean()
    return total


def sample_patch_pairs(num_patches: int, num_pairs: int | None, device: torch.device,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query patch index pairs (u, v): every pair u < v when ``num_pairs`` is None, else that many drawn
    uniformly (u != v)."""
    if num_pairs is None:
        u, v = torch.triu_indices(num_patches, num_patches, offset=1, device=device)
        return u, v
    u = torch.randint(num_patches, (num_pairs,), device=device, generator=generator)
    # An offset in [1, P-1] makes v differ from u.
    v = (u + torch.randint(1, max(num_patches, 2), (num_pairs,), device=device, generator=generator)) % num_patches
    return u, v


def ranking_loss(patch_logits: list[torch.Tensor], guidance: list[torch.Tensor], scale: float = 1.0,
                 num_pairs: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """L_rank (eq. 4): sum over query patch pairs of w_uv max(0, 1 - sigma (s_u - s_v)) at every scale,

    with w_uv = scale (exp|a_u - a_v| - 1) and sigma = -sgn(a_u - a_v): the patch less similar to the
    references (smaller co-attention guidance a) must get the larger anomaly score s.

    patch_logits: per scale [B, N_Q] logits of s_i^j. guidance: per scale [B, N_Q] a_i^j = max_k a_i^jk,
    used as a target (detach it). The pair sum is averaged over the pairs, so ``scale`` (lambda) does
    not depend on how many pairs are drawn.
    """
    total = 0.0
    for logits, attention in zip(patch_logits, guidance, strict=True):
        scores, attention = torch.sigmoid(logits.float()), attention.float()
        u, v = sample_patch_pairs(scores.shape[1], num_pairs, scores.device, generator)
        difference = attention[:, u] - attention[:, v]
        weight = scale * torch.expm1(difference.abs())
        sigma = -torch.sign(difference)
        hinge = F.relu(1 - sigma * (scores[:, u] - scores[:, v]))
        total = total + (weight * hinge).mean()
    return total
