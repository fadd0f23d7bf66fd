"""Lightning side: the training module and callbacks."""

from .callbacks import EMA, AtomicCheckpointIO, BitsPerDim, RNGState, SampleGrid, StepCheckpoint
from .fid_callback import FIDCallback
from .module import DiffusionModule, count_parameters, lr_lambda

__all__ = ["EMA", "AtomicCheckpointIO", "BitsPerDim", "DiffusionModule", "FIDCallback", "RNGState", "SampleGrid", "StepCheckpoint", "count_parameters", "lr_lambda"]
