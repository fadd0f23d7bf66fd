"""Loading trained models back from Lightning checkpoints, without Lightning.

A ddlab checkpoint stores the resolved run config under ``hyper_parameters.run_config``, the
weights under ``state_dict`` (``model.*`` live, ``ema_model.*`` EMA), so it rebuilds itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ddlab.diffusion import GaussianDiffusion


@dataclass
class LoadedCheckpoint:
    model: nn.Module          # the network with the requested weights (EMA by default), eval mode
    diffusion: GaussianDiffusion
    config: dict              # the resolved run config of the training run
    global_step: int
    path: Path
    ema: bool


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", key: str = "ckpt") -> dict:
    """``torch.load`` with errors that name the file, the config ``key`` it came from and the fix."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist ({key}=...: give the path to a .ckpt file, e.g. <run>/checkpoints/last.ckpt)")
    try:
        ck = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:
        raise RuntimeError(
            f"checkpoint {p} is corrupt or truncated ({type(e).__name__}: {e}); use another checkpoint of the run"
        ) from e
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise RuntimeError(f"{p} is not a Lightning checkpoint (no state_dict)")
    return ck


def run_config(ck: dict, path: str | os.PathLike = "checkpoint") -> dict:
    cfg = (ck.get("hyper_parameters") or {}).get("run_config")
    if not cfg:
        raise RuntimeError(f"{path} has no run_config in its hyper-parameters: it was not written by ddlab.train")
    return cfg


def load_checkpoint(path: str | os.PathLike, use_ema: bool = True, map_location: Any = "cpu",
                    device: Optional[torch.device | str] = None) -> LoadedCheckpoint:
    """Rebuild the network and diffusion of a ddlab checkpoint.

    ``use_ema=True`` loads the EMA weights (what samples and FID use), else the live weights.
    """
    from hydra.utils import instantiate

    ck = read_checkpoint(path, map_location)
    cfg = run_config(ck, path)
    model = instantiate(cfg["model"])
    diffusion = instantiate(cfg["scheduler"])
    prefix = "ema_model." if use_ema else "model."
    state = {k[len(prefix):]: v for k, v in ck["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise RuntimeError(f"{path} holds no '{prefix}*' weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"checkpoint {path} does not fit the model config stored with it ({str(e).splitlines()[0]}); "
            "was it written by another model config or ddlab version?"
        ) from e
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return LoadedCheckpoint(model=model, diffusion=diffusion, config=cfg, global_step=int(ck.get("global_step", 0)), path=Path(path), ema=use_ema)
