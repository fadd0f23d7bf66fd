"""FID during training: every ``every_n_epochs`` epochs, at the end of validation."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ddlab import evaluation as ev

log = logging.getLogger("ddlab.training")


def run_sampler(pl_module, overrides: Optional[dict] = None):
    """The run's sampler rebuilt from its stored config (``run_config.sampler``) with ``overrides``
    merged (:func:`ddlab.evaluation.sampler_config`), its own bar off; a copy of ``pl_module.sampler``
    with the overrides set as attributes when the module carries no run config."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    stored = (pl_module.hparams.get("run_config") or {}).get("sampler")
    if stored:
        cfg = ev.sampler_config(stored, overrides)
        if "steps" in overrides and cfg.get("step_size") is not None:
            cfg["step_size"] = None  # the callback's `steps` wins over a stored every-k-th-step rule
        return ev.build_sampler(cfg, progress=False)
    sampler = copy.copy(pl_module.sampler)
    for k, v in {**overrides, "progress": False}.items():
        setattr(sampler, k, v)
    return sampler


class FIDCallback(Callback):
    """Sample ``num_samples`` images with the EMA weights and the run's sampler (its stored config
    with ``steps`` replaced when given; guidance, batching and the rest as trained), classes balanced
    and shuffled for class-conditional models, with the seeding rules of :mod:`ddlab.evaluation`
    (the images ``ddlab.fid`` draws for the same seed and batch size). Under DDP every rank draws
    ``ceil(num_samples / world_size)`` and rank 0 gathers them, computes FID (KID / Inception Score
    if asked) against the cached reference statistics of the data module's reference split, and
    broadcasts it. Logs ``val/fid`` and ``val/fid_best`` (the same value on every rank, so
    ``ModelCheckpoint(monitor="val/fid", mode="min")`` works), and saves a grid of the first 100
    samples to ``dirpath/epoch_NNNN.png``. ``every_n_epochs=0`` turns it off. Runs after validation,
    so it needs the validation loop (``trainer.limit_val_batches > 0``).
    """

    def __init__(self, every_n_epochs: int = 0, num_samples: int = 1000, steps: int | None = 50, batch_size: int = 250,
                 dirpath: str | None = None, cache_dir: str = "logs/fid_stats", weights_path: str | None = None,
                 feature_batch_size: int = 64, kid: bool = False, isc: bool = False, seed: int = 0, progress: bool = False,
                 feature_extractor: str = "inception", classifier_path: str | None = None):
        if every_n_epochs < 0:
            raise ValueError(f"callbacks.fid.every_n_epochs must be >= 0 (0 = off), got {every_n_epochs}")
        if every_n_epochs and num_samples < 2:
            raise ValueError(f"callbacks.fid.num_samples must be >= 2 for FID, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"callbacks.fid.batch_size must be >= 1, got {batch_size}")
        self.every_n_epochs = int(every_n_epochs)
        self.num_samples = int(num_samples)
        self.steps = steps
        self.batch_size = int(batch_size)
        self.dirpath = Path(dirpath) if dirpath else None
        self.cache_dir = cache_dir
        self.weights_path = weights_path
        self.feature_batch_size = int(feature_batch_size)
        self.kid, self.isc = bool(kid), bool(isc)
        self.seed = int(seed)
        self.progress = progress
        self.feature_extractor = feature_extractor
        self.classifier_path = classifier_path
        self._labels = None
        self.best = math.inf
        self._evaluator = None
        self._last_epoch = -1

    # state: the best FID survives a resume
    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = float(state_dict.get("best", math.inf))

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.every_n_epochs and stage == "fit" and trainer.is_global_zero:
            self.evaluator(trainer, pl_module)  # missing weights fail before training starts

    def evaluator(self, trainer, pl_module):
        if self._evaluator is None:
            from ddlab.metrics import Evaluator

            data_cfg = (pl_module.hparams.get("run_config") or {}).get("data") or {}
            self._evaluator = Evaluator(data_cfg, trainer.datamodule, cache_dir=self.cache_dir, weights_path=self.weights_path,
                                        device=pl_module.device, batch_size=self.feature_batch_size, kid=self.kid,
                                        isc=self.isc, progress=self.progress, key_prefix="callbacks.fid",
                                        feature_extractor=self.feature_extractor, classifier_path=self.classifier_path)
        return self._evaluator

    def due(self, trainer) -> bool:
        return (self.every_n_epochs > 0 and not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0
                and trainer.current_epoch != self._last_epoch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.due(trainer):
            return
        self._last_epoch = trainer.current_epoch
        images = self.sample_all_ranks(trainer, pl_module)
        value = torch.zeros(1, dtype=torch.float64, device=pl_module.device)
        if trainer.is_global_zero:
            scores = self.evaluator(trainer, pl_module).evaluate(images, labels=self._labels)
            value[0] = scores["fid"]
            extra = {k: scores[k] for k in ("kid_mean", "is_mean", "class_accuracy", "class_entropy") if k in scores}
            log.info("epoch %d: FID %.4f over %d samples %s", trainer.current_epoch, scores["fid"], len(images), extra)
            self._save_grid(images, trainer.current_epoch)
        else:
            extra = {}
        value = trainer.strategy.broadcast(value, src=0)
        fid = float(value[0])
        self.best = min(self.best, fid)
        pl_module.log("val/fid", fid, on_epoch=True, sync_dist=True)
        pl_module.log("val/fid_best", self.best, on_epoch=True, sync_dist=True)
        for k, v in extra.items():  # rank 0 only
            pl_module.log(f"val/{k}", float(v), on_epoch=True, rank_zero_only=True)

    def sample_all_ranks(self, trainer, pl_module) -> np.ndarray | None:
        """Every rank samples its share; returns ``(num_samples, H, W, C)`` uint8 on rank 0 (None elsewhere)."""
        world, rank = trainer.world_size, trainer.global_rank
        share = math.ceil(self.num_samples / world)
        labels = ev.balanced_labels(share * world, pl_module.num_classes, self.seed)
        mine = labels[rank * share:(rank + 1) * share] if labels is not None else None
        self._labels = labels[: self.num_samples].numpy() if labels is not None else None
        sampler = run_sampler(pl_module, {"steps": self.steps})
        w = float(sampler.guidance_scale) if pl_module.num_classes else 1.0
        if rank == 0:
            log.info("FID sampling: %d images with %s (%s steps, guidance %.3g)", self.num_samples,
                     ev.sampler_name(sampler, {}), sampler.steps, w)
        net = pl_module.ema_model
        was_training = net.training
        net.eval()
        try:
            local = ev.generate_uint8(net, pl_module.diffusion, sampler, share, self.batch_size, labels=mine, guidance_scale=w,
                                      seed=self.seed, progress=self.progress and rank == 0, desc="FID sampling",
                                      first_index=rank * share)
        finally:
            net.train(was_training)
        x = torch.from_numpy(local).to(pl_module.device)
        if world > 1:
            x = pl_module.all_gather(x)  # (world, share, H, W, C)
            x = x.reshape(-1, *x.shape[2:])
        return x[: self.num_samples].cpu().numpy() if trainer.is_global_zero else None

    def _save_grid(self, images: np.ndarray, epoch: int) -> None:
        if self.dirpath is not None:
            ev.save_grid(images[:100], self.dirpath / f"epoch_{epoch:04d}.png")
