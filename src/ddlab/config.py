"""Hydra/OmegaConf helpers shared by the entry points."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf



def _config_dir() -> Path:
    """The Hydra config folder: ``ddlab/configs`` inside an installed wheel, else ``configs/`` at the top of
    the source checkout (``PYTHONPATH=src`` or an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"ddlab's configs were found neither in {here / 'configs'} (installed package) nor in {here.parents[1] / 'configs'} "
        "(source checkout): reinstall ddlab (`pip install .` from the repository) or run from a full checkout"
    )


# every entry point's @hydra.main(config_path=...) and the tests compose from here
CONFIG_DIR = _config_dir()
CONFIG_PATH = str(CONFIG_DIR)


def _out_channels(channels, variance) -> int:
    """Network output channels for ``channels`` image channels: doubled for learned variance."""
    return 2 * int(channels) if str(variance) == "learned_range" else int(channels)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ddlab.out_channels"):
        OmegaConf.register_new_resolver("ddlab.out_channels", _out_channels)


register_resolvers()
