"""PaDiM: per-position Gaussians of frozen CNN features, Mahalanobis anomaly maps."""

from lightning_modules.padim.lightning_model import Padim
from lightning_modules.padim.torch_model import DamagedStatisticsError, NotFittedError, PadimModel

__all__ = ["DamagedStatisticsError", "NotFittedError", "Padim", "PadimModel"]
