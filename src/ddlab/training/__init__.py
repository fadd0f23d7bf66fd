"""Lightning side: the training module and callbacks."""

from .callbacks import EMA, AtomicCheckpointIO, BitsPerDim, RNGState, SampleGrid, StepCheckpoint
from .fid_callback import FIDCallback
from .lr_schedule import WarmupDecay, warmup_decay
from .module import DiffusionModule, NonFiniteLossError, count_parameters

__all__ = ["EMA", "AtomicCheckpointIO", "BitsPerDim", "DiffusionModule", "FIDCallback", "RNGState", "SampleGrid", "StepCheckpoint", "NonFiniteLossError", "WarmupDecay", "count_parameters", "warmup_decay"]
