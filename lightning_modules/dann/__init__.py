"""Domain-adaptive defect classifier of paper 000: DANN, ADDA, source-only and AdaBN."""

from lightning_modules.dann.lightning_model import DANN, MODES
from lightning_modules.dann.torch_model import BN_POLICIES, DomainAdaptiveClassifier, Encoder

__all__ = ["BN_POLICIES", "DANN", "DomainAdaptiveClassifier", "Encoder", "MODES"]
