"""Callbacks shared by every ShiftAD method."""

from callbacks.figures import AnomalyMapGrid, save_figure
from callbacks.predictions import PredictionWriter
from callbacks.results import ResultsWriter

__all__ = ["AnomalyMapGrid", "PredictionWriter", "ResultsWriter", "save_figure"]
