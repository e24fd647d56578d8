"""ADDA (adversarial discriminative domain adaptation) of paper 000's normal/defect classifier."""

from lightning_modules.adda.lightning_model import ADDA
from lightning_modules.adda.torch_model import AdversarialAdaptationClassifier

__all__ = ["ADDA", "AdversarialAdaptationClassifier"]
