"""Push the trained model to the Hugging Face Hub when training ends (the diffusers tutorial's
``push_to_hub`` / ``hub_model_id``): ``python -m ddlab.train push_to_hub=true hub_model_id=user/repo``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("ddlab.hub")


class PushToHub(Callback):
    """At the end of ``fit``, export the model (EMA weights unless ``ema=False``) to ``dirpath`` as a
    ddlab folder (:func:`ddlab.hub.export_model`: weights, config, model card with a sample grid and the
    run's metrics) and, when ``push_to_hub``, upload it to ``hub_model_id``. Rank zero only. A failed
    upload is logged with the command that retries it; it does not fail the finished run."""

    def __init__(self, push_to_hub: bool = False, hub_model_id: Optional[str] = None, dirpath: str = "export",
                 private: bool = False, ema: bool = True, grid_n: int = 16):
        if push_to_hub and (not hub_model_id or str(hub_model_id).count("/") != 1):
            raise ValueError(f"push_to_hub=true needs hub_model_id=user/repo, got {hub_model_id!r}")
        self.push_to_hub = bool(push_to_hub)
        self.hub_model_id = hub_model_id
        self.dirpath = Path(dirpath)
        self.private = bool(private)
        self.ema = bool(ema)
        self.grid_n = int(grid_n)
        self.url: Optional[str] = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.push_to_hub or not trainer.is_global_zero:
            return
        from ddlab.hub import export_model, push_to_hub

        run_config = pl_module.hparams.get("run_config") or {}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        metrics["global_step"] = int(trainer.global_step)
        model = pl_module.ema_model if self.ema else pl_module.model
        folder = export_model(model, run_config, self.dirpath, global_step=trainer.global_step, ema=self.ema,
                              metrics=metrics, grid_n=self.grid_n)
        try:
            self.url = push_to_hub(folder, str(self.hub_model_id), private=self.private)
            log.info("pushed the model to %s (local copy: %s)", self.url, folder)
        except Exception as e:  # the run itself succeeded: keep its checkpoints and say how to retry
            log.error("push to the Hub (%s) failed: %s: %s; the export is in %s; retry with "
                      "python -c \"from ddlab.hub import push_to_hub; push_to_hub('%s', '%s')\"",
                      self.hub_model_id, type(e).__name__, e, folder, folder, self.hub_model_id)
