"""DenseHybridAD (paper 004): hybrid energy / outlier-head dense anomaly detection with pasted negatives."""

from lightning_modules.densehybrid.lightning_model import DenseHybridAD
from lightning_modules.densehybrid.loss import densehybrid_loss
from lightning_modules.densehybrid.torch_model import DenseHybridModel

__all__ = ["DenseHybridAD", "DenseHybridModel", "densehybrid_loss"]
