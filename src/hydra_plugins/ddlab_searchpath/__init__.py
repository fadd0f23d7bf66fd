"""Hydra search-path plugin: ``DDLAB_CONFIG_PATH`` adds a user's config folders to ddlab's commands.

``DDLAB_CONFIG_PATH=/my/configs:pkg://mypkg.configs python -m ddlab.train model=mynet`` makes the
groups in those folders (``model/mynet.yaml``, ``data/mydata.yaml``, ``experiment/...``) selectable
as if they were ddlab's own. Folders are separated by ``os.pathsep`` and searched in order, before
ddlab's ``configs/`` (a user's file with the same name as one of ddlab's wins). Hydra finds this
module in the ``hydra_plugins`` namespace package; it changes only ddlab's commands.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.plugins.search_path_plugin import SearchPathPlugin

ENV = "DDLAB_CONFIG_PATH"


def _is_ddlab(path: str) -> bool:
    from ddlab.config import CONFIG_DIR

    path = path[len("file://"):] if path.startswith("file://") else path
    return path == "pkg://ddlab.configs" or (not path.startswith("pkg://") and Path(path).resolve() == CONFIG_DIR)


def user_config_dirs(value: str | None = None) -> list[str]:
    """The entries of ``DDLAB_CONFIG_PATH`` as Hydra search-path elements (``pkg://`` kept, folders absolute)."""
    value = os.environ.get(ENV, "") if value is None else value
    out = []
    for entry in filter(None, (e.strip() for e in value.split(os.pathsep))):
        if entry.startswith("pkg://"):
            out.append(entry)
            continue
        folder = Path(entry[len("file://"):] if entry.startswith("file://") else entry).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"{ENV}: {entry!r} is not a folder (set it to folders of config groups, separated by {os.pathsep!r})")
        out.append(f"file://{folder}")
    return out


class DdlabSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not os.environ.get(ENV) or not any(e.provider == "main" and _is_ddlab(e.path) for e in search_path.get_path()):
            return
        for folder in user_config_dirs():
            search_path.prepend(provider=ENV, path=folder, anchor=SearchPathQuery(provider="main"))
