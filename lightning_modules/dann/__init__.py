"""Domain-adaptive defect classifier of paper 000: DANN, source-only and AdaBN (ADDA: ``lightning_modules.adda``)."""

from lightning_modules.dann.lightning_model import DANN, MODES
from lightning_modules.dann.torch_model import BN_POLICIES, DomainAdaptiveClassifier

__all__ = ["BN_POLICIES", "DANN", "DomainAdaptiveClassifier", "MODES"]
