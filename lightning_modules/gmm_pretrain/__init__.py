"""Paper 003's pre-training: regress random-GMM pseudo-defect parameters, then reuse the backbone in PaDiM."""

from lightning_modules.gmm_pretrain.datamodule import GMMPretrainDataModule, NormalPool, PseudoDefectPairs
from lightning_modules.gmm_pretrain.lightning_model import BACKBONE_FILE, GMMPretrain
from lightning_modules.gmm_pretrain.torch_model import GMMRegressor

__all__ = ["BACKBONE_FILE", "GMMPretrain", "GMMPretrainDataModule", "GMMRegressor", "NormalPool",
           "PseudoDefectPairs"]
