"""ShiftAD data layer: dataset readers, the embedded "surfaces" datasets, domain specs, shifts and DataModules.

Every dataset item is a dict: ``image`` float32 [3, H, W] in [0, 1] (NOT normalised; the model's
``FeatureExtractor`` applies its weights' mean/std), ``label`` int, ``mask`` float32 [1, H, W],
``has_mask`` bool, ``defect_type`` str, ``domain`` str, ``domain_index`` int, ``path`` str.
"""

from datamodules.domain import Domain
from datamodules.lodo import EpisodeDataset, LODODataModule
from datamodules.one_class import OneClassDataModule
from datamodules.paired import PairedDomainDataModule
from datamodules.shifts import SHIFT_NAMES, Shift

__all__ = [
    "Domain",
    "EpisodeDataset",
    "LODODataModule",
    "OneClassDataModule",
    "PairedDomainDataModule",
    "SHIFT_NAMES",
    "Shift",
]
