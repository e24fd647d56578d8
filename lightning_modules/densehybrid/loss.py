"""DenseHybridAD's loss: paper 004, equation 1, with DenseHybrid's weighting of its terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def densehybrid_loss(logits: torch.Tensor, outlier_logits: torch.Tensor, pasted: torch.Tensor, beta: float,
                     outlier_head_weight: float, class_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss terms, each already weighted (their sum is the loss).

    Args:
        logits: [B, K, H, W] segmentation logits s_k(x).
        outlier_logits: [B, H, W] logits of P(d_out|x).
        pasted: [B, H, W] bool, True on pasted negative pixels (x ∈ D_out).
        beta: β, the weight of the energy term.
        outlier_head_weight: weight of the outlier head's term (DenseHybrid: 10 β).
        class_targets: [B] image-level classes for the optional primary task (per-pixel cross-entropy
            on the inlier pixels), or None for paper 004's setting without a primary task.
    """
    outliers = pasted.float()
    inliers = 1 - outliers
    # −E_in[ln P(d_in|x)] − E_out[ln P(d_out|x)]: the outlier head against the paste map, over all pixels.
    terms = {"outlier_head": outlier_head_weight
             * F.binary_cross_entropy_with_logits(outlier_logits.float(), outliers)}
    # β · E_out[ln p̂(x)], ln p̂(x) = logsumexp_k s_k(x): pushes the log-density down on pasted pixels.
    log_density = torch.logsumexp(logits.float(), dim=1)
    terms["energy"] = beta * (log_density * outliers).sum() / outliers.sum().clamp_min(1)
    if class_targets is not None:
        # −E_in[ln P(y|x)]: the primary discriminative task on the normal pixels.
        targets = class_targets.view(-1, 1, 1).expand_as(pasted)
        cross_entropy = F.cross_entropy(logits.float(), targets, reduction="none")
        terms["category_ce"] = (cross_entropy * inliers).sum() / inliers.sum().clamp_min(1)
    return terms
