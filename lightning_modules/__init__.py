"""ShiftAD methods: each a plain ``nn.Module`` (torch model) and a thin LightningModule around it.

Importing this package registers every method for ``python cli.py --help`` and short class names.
"""

from lightning_modules.adda import ADDA
from lightning_modules.base import AnomalyDetectionModule, ShiftADModule
from lightning_modules.csflow import CSFlow, CSFlowAdaptation
from lightning_modules.dann import DANN
from lightning_modules.densehybrid import DenseHybridAD
from lightning_modules.gmm_pretrain import GMMPretrain, GMMPretrainDataModule
from lightning_modules.meta_comparer import (
    KNNPatchBaseline,
    MetaComparer,
    MetaComparerAggregate,
    PadimReferenceBaseline,
)
from lightning_modules.padim import Padim

__all__ = [
    "ADDA",
    "AnomalyDetectionModule",
    "CSFlow",
    "CSFlowAdaptation",
    "DANN",
    "DenseHybridAD",
    "GMMPretrain",
    "GMMPretrainDataModule",
    "KNNPatchBaseline",
    "PadimReferenceBaseline",
    "MetaComparer",
    "MetaComparerAggregate",
    "Padim",
    "ShiftADModule",
]
