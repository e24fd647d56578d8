"""Callbacks shared by every ShiftAD method."""

from callbacks.figures import AnomalyMapGrid, save_figure
from callbacks.results import ResultsWriter

__all__ = ["AnomalyMapGrid", "ResultsWriter", "save_figure"]
