"""Co-attention meta-comparer with ranking loss (paper 002), its ``aggregate`` ablation and the AD baselines
(k-NN patch, PaDiM) fitted on the target references."""

from lightning_modules.meta_comparer.lightning_model import (
    KNNPatchBaseline,
    MetaComparer,
    MetaComparerAggregate,
    PadimReferenceBaseline,
)
from lightning_modules.meta_comparer.torch_model import (
    CoAttention,
    FactorisedComparer,
    MetaComparerModel,
    MultiScalePatchEncoder,
)

__all__ = [
    "CoAttention",
    "FactorisedComparer",
    "KNNPatchBaseline",
    "MetaComparer",
    "MetaComparerAggregate",
    "MetaComparerModel",
    "MultiScalePatchEncoder",
    "PadimReferenceBaseline",
]
