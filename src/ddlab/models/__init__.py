"""Networks in plain PyTorch (no Lightning, no Hydra)."""

from .blocks import BLOCKS, ResBlock, register_block
from .embeddings import ClassEmbedding, TimeEmbedding, timestep_embedding
from .unet import UNet

__all__ = ["BLOCKS", "ClassEmbedding", "ResBlock", "TimeEmbedding", "UNet", "register_block", "timestep_embedding"]
