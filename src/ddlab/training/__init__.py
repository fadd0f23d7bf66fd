"""Lightning side: the training module and callbacks."""

from .callbacks import EMA, AtomicCheckpointIO, RNGState, SampleGrid, StepCheckpoint
from .fid_callback import FIDCallback
from .module import DiffusionModule, count_parameters, lr_lambda

__all__ = ["EMA", "AtomicCheckpointIO", "DiffusionModule", "FIDCallback", "RNGState", "SampleGrid", "StepCheckpoint", "count_parameters", "lr_lambda"]
