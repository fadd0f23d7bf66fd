"""Hydra/OmegaConf helpers shared by the entry points."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _out_channels(channels, variance) -> int:
    """Network output channels for ``channels`` image channels: doubled for learned variance."""
    return 2 * int(channels) if str(variance) == "learned_range" else int(channels)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ddlab.out_channels"):
        OmegaConf.register_new_resolver("ddlab.out_channels", _out_channels)


register_resolvers()
