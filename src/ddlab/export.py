"""Export entry point: ``python -m ddlab.export ckpt=PATH out=DIR [ema=false format=diffusers
push_to_hub=true hub_model_id=user/repo]`` (Hydra, ``configs/export.yaml``).

``format=ddlab`` writes a folder that :func:`ddlab.load_pretrained` reads back (see :mod:`ddlab.hub`);
``format=diffusers`` writes a standard diffusers pipeline folder (see :mod:`ddlab.interop.pipelines`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ddlab import config as _config  # noqa: F401  (registers resolvers)

log = logging.getLogger("ddlab.export")
FORMATS = ("ddlab", "diffusers")


def export(cfg: DictConfig) -> Path:
    """Write the export folder (and upload it when ``push_to_hub``); returns the folder."""
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"format: unknown value {fmt!r}; choose from {', '.join(FORMATS)}")
    if cfg.push_to_hub and not cfg.get("hub_model_id"):
        raise ValueError("push_to_hub=true needs hub_model_id=user/repo")
    device = str(cfg.get("device", "auto"))
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if fmt == "diffusers":
        from ddlab.interop.pipelines import export_diffusers_checkpoint

        out = export_diffusers_checkpoint(cfg.ckpt, cfg.out, pipeline=str(cfg.pipeline), ema=bool(cfg.ema))
    else:
        from ddlab.hub import export_checkpoint

        out = export_checkpoint(cfg.ckpt, cfg.out, ema=bool(cfg.ema), grid_n=int(cfg.grid_n), seed=int(cfg.seed), device=device)
    log.info("exported %s (%s weights) to %s", cfg.ckpt, "EMA" if cfg.ema else "live", out)
    if cfg.push_to_hub:
        from ddlab.hub import push_to_hub

        url = push_to_hub(out, str(cfg.hub_model_id), private=bool(cfg.private), verify=fmt == "ddlab")
        log.info("pushed %s to %s", out, url)
    return Path(out)


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> Any:
    export(cfg)


if __name__ == "__main__":
    main()
