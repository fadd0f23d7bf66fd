"""Hydra/OmegaConf helpers shared by the entry points: where the configs live, the ``ddlab.*``
resolvers, and ``DDLAB_CONFIG_PATH`` (a user's config folders, searched before ddlab's own)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
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


USER_CONFIG_ENV = "DDLAB_CONFIG_PATH"


def user_config_dirs(value: str | None = None) -> list[str]:
    """The entries of ``DDLAB_CONFIG_PATH`` (separated by ``os.pathsep``) as Hydra search-path elements:
    ``pkg://`` entries as they are, folders as absolute ``file://`` paths."""
    value = os.environ.get(USER_CONFIG_ENV, "") if value is None else value
    out = []
    for entry in filter(None, (e.strip() for e in value.split(os.pathsep))):
        if entry.startswith("pkg://"):
            out.append(entry)
            continue
        folder = Path(entry.removeprefix("file://")).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{USER_CONFIG_ENV}: {entry!r} is not a folder (set it to folders of config groups such as model/ and data/, "
                f"separated by {os.pathsep!r})"
            )
        out.append(f"file://{folder}")
    return out


class UserConfigSearchPath(SearchPathPlugin):
    """Puts the folders of ``DDLAB_CONFIG_PATH`` in front of ddlab's ``configs/`` (a user's file with the
    same name as one of ddlab's wins); other Hydra applications are left alone."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        def is_ddlab(p: str) -> bool:
            return not p.startswith("pkg://") and Path(p.removeprefix("file://")).resolve() == CONFIG_DIR

        if not os.environ.get(USER_CONFIG_ENV) or not any(e.provider == "main" and is_ddlab(e.path) for e in search_path.get_path()):
            return
        for folder in user_config_dirs():
            search_path.prepend(provider=USER_CONFIG_ENV, path=folder, anchor=SearchPathQuery(provider="main"))


def register_search_path_plugin() -> None:
    """Register :class:`UserConfigSearchPath` with Hydra (once); the entry points import this module."""
    plugins = Plugins.instance()
    if UserConfigSearchPath not in plugins.discover(SearchPathPlugin):
        plugins.register(UserConfigSearchPath)


register_resolvers()
register_search_path_plugin()
