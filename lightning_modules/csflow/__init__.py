"""CS-Flow with frozen-flow, few-shot feature-extractor adaptation (paper 001)."""

from lightning_modules.csflow.lightning_model import CSFlow, CSFlowAdaptation, load_source_model
from lightning_modules.csflow.torch_model import CSFlowModel

__all__ = ["CSFlow", "CSFlowAdaptation", "CSFlowModel", "load_source_model"]
