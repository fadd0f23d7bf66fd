"""ddlab: pixel-space image diffusion research framework."""

__version__ = "0.1.0"
