"""Lightning side: the training module and callbacks."""

from .callbacks import EMA, AtomicCheckpointIO, SampleGrid
from .fid_callback import FIDCallback
from .module import DiffusionModule, count_parameters, lr_lambda

__all__ = ["EMA", "AtomicCheckpointIO", "DiffusionModule", "FIDCallback", "SampleGrid", "count_parameters", "lr_lambda"]
