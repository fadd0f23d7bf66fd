"""Lightning side: the training module and callbacks."""

from .callbacks import EMA, AtomicCheckpointIO, SampleGrid
from .module import DiffusionModule, count_parameters, lr_lambda

__all__ = ["EMA", "AtomicCheckpointIO", "DiffusionModule", "SampleGrid", "count_parameters", "lr_lambda"]
