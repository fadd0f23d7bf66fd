"""Weights & Biases plumbing around Lightning's ``WandbLogger``.

* :func:`set_resume_id` — before the loggers are built: when resuming from a checkpoint that holds a
  W&B run id, hand that id to every ``WandbLogger`` config entry so the same run continues
  (``WandbLogger`` always passes ``resume="allow"`` to ``wandb.init``).
* :class:`WandbRunId` — a callback that writes ``checkpoint["wandb"] = {"run_id", "project"}``.
* :func:`finish` — ``wandb.finish(exit_code)`` for every started run; call it in a ``finally`` so a
  failing job closes its run (marked failed) and the next job of a sweep starts a fresh one.

Only ``wandb`` and Lightning are used here; nothing reads Hydra.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "wandb"
_WANDB_TARGETS = ("lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.wandb.WandbLogger",
                  "pytorch_lightning.loggers.WandbLogger", "pytorch_lightning.loggers.wandb.WandbLogger")


def is_wandb_logger(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def read_run_id(ckpt_path: Optional[str]) -> Optional[str]:
    """The W&B run id stored in checkpoint ``ckpt_path`` by :class:`WandbRunId`, or ``None``
    (no path, missing file, or a checkpoint written without a W&B logger)."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    try:  # mmap: the tensors are not read into memory just to look up one string
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    entry = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, Mapping) else None
    return entry.get("run_id") if isinstance(entry, Mapping) else None


def set_resume_id(logger_cfg: Optional[Any], ckpt_path: Optional[str], fallback_id: Optional[str] = None) -> Optional[str]:
    """Give every W&B entry of ``logger_cfg`` (an OmegaConf dict of logger configs) the run id stored
    in ``ckpt_path`` (else ``fallback_id``, e.g. derived from a fixed ``run_id``), unless the user set
    ``logger.<name>.id`` explicitly. Returns the id used."""
    if not logger_cfg:
        return None
    entries = [v for v in logger_cfg.values() if v is not None and str(v.get("_target_", "")) in _WANDB_TARGETS]
    if not entries:
        return None
    run_id = read_run_id(ckpt_path) or fallback_id
    if run_id is None:
        return None
    from omegaconf import open_dict

    for entry in entries:
        if entry.get("id") is None and entry.get("version") is None:
            with open_dict(entry):
                entry.id = run_id
            log.info("resuming W&B run %s from %s", run_id, ckpt_path)
    return run_id


class WandbRunId(Callback):
    """Stores the W&B run id (and project) in every checkpoint so a resume continues the same run."""

    def __init__(self, logger: Any):
        self.logger = logger

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        run_id = self.logger.version  # the live run's id once started, else the configured id
        if run_id:
            checkpoint[CHECKPOINT_KEY] = {"run_id": str(run_id), "project": self.logger.name}


def callbacks_for(loggers: Iterable[Any]) -> list:
    """The extra callbacks the given loggers need (one :class:`WandbRunId` per W&B logger)."""
    return [WandbRunId(lg) for lg in loggers if is_wandb_logger(lg)]


def finish(loggers: Iterable[Any], exit_code: int = 0) -> None:
    """Close every W&B run started by ``loggers`` (and any run left open in this process) with
    ``exit_code`` (non-zero marks it failed). Safe to call when nothing was started."""
    if "wandb" not in sys.modules:
        return
    import wandb

    for lg in loggers:
        if is_wandb_logger(lg) and getattr(lg, "_experiment", None) is not None:
            try:
                lg._experiment.finish(exit_code=exit_code)
            except Exception as e:  # never hide the training error behind a logging one
                log.warning("wandb finish failed: %s", e)
            lg._experiment = None
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
