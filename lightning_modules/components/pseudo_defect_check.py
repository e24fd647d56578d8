"""A label-free check of a detector update: does the detector still tell its k target shots from pseudo-defective
copies of them as well as it did before the update?

The copies carry Gaussian-mixture defects (paper 003's f_ano, ``gmm_defects.render_defects``) drawn from a fixed
seed, so the source and the updated detector face the same images. The separation is the AUROC of the image
scores, pseudo-defects against the clean views. Why not the NLL of held-out shots: an extractor updated to lower
a frozen flow's NLL lowers it for every input at once (its features shrink toward the flow's mode), so the NLL
improves exactly when the detector collapses. The separation falls in that case. Only the shots' images are
read, never a label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from lightning_modules.components.gmm_defects import render_defects, sample_gmm_params
from lightning_modules.components.metrics import auroc
from lightning_modules.components.target_recalibration import Views, label_preserving_views

PSEUDO_DEFECTS_PER_VIEW = 2
PSEUDO_DEFECT_SEED = 0
CHUNK = 16  # images scored per forward pass


class SeparationVerdict(NamedTuple):
    kept: bool
    adapted: float  # AUROC, pseudo-defects vs clean views, after the update
    source: float  # the same before it

    def summary(self, shots: int, enforced: bool) -> tuple[str, dict[str, float]]:
        """The decision as a log line and as the ``adapt/`` metrics a run logs once (``adapt/kept`` only where the
        rule is enforced)."""
        kept = self.kept or not enforced
        line = (f"phase-2 safety rule on {shots} target shots: {'kept' if kept else 'declined, source kept'} "
                f"(pseudo-defect separation AUROC: adapted {self.adapted:.3f}, source {self.source:.3f}"
                f"{'' if enforced else '; rule off'})")
        return line, {"adapt/kept": float(kept), **self.figures} if enforced else self.figures

    @property
    def figures(self) -> dict[str, float]:
        return {"adapt/pseudo_defect_auroc_adapted": self.adapted, "adapt/pseudo_defect_auroc_source": self.source}


def pseudo_defect_set(shots: torch.Tensor, views: Views) -> tuple[torch.Tensor, torch.Tensor]:
    """shots [k, 3, H, W] in [0, 1] -> (images, labels): the shots' views, then ``PSEUDO_DEFECTS_PER_VIEW``
    pseudo-defective copies of each (label 1), always the same for the same shots."""
    clean = label_preserving_views(shots, views)
    generator = torch.Generator().manual_seed(PSEUDO_DEFECT_SEED)
    repeated = clean.repeat(PSEUDO_DEFECTS_PER_VIEW, 1, 1, 1)
    params = sample_gmm_params(len(repeated), generator=generator)
    params = type(params)(*(t.to(shots.device) for t in vars(params).values()))
    defective, _ = render_defects(repeated, params)
    labels = torch.cat([torch.zeros(len(clean)), torch.ones(len(defective))]).long()
    return torch.cat([clean, defective.to(clean.dtype)]), labels


@torch.no_grad()
def separation(image_scores: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
               labels: torch.Tensor) -> float:
    """AUROC (rank-based) of ``image_scores`` on ``images``: pseudo-defects (1) against clean views (0)."""
    scores = torch.cat([image_scores(chunk).float().cpu() for chunk in images.split(CHUNK)])
    if not torch.isfinite(scores).all():
        return float("nan")
    return auroc(scores, labels)


def verdict(adapted: float, source: float) -> SeparationVerdict:
    """Keep the update when it separates at least as well as the source (a non-finite score declines it)."""
    return SeparationVerdict(bool(adapted >= source), adapted, source)
