"""ShiftAD methods: each a plain ``nn.Module`` (torch model) and a thin LightningModule around it."""

from lightning_modules.base import AnomalyDetectionModule, ShiftADModule

__all__ = ["AnomalyDetectionModule", "ShiftADModule"]
