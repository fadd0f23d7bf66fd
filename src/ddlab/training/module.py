"""The Lightning module for the denoising objective."""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from ddlab.diffusion import ConfiguredSampler, GaussianDiffusion, make_timestep_sampler, samplers


class DiffusionModule(pl.LightningModule):
    """Trains ``model`` to denoise under ``diffusion``; keeps an EMA copy for sampling.

    Args:
        model: the network ``model(x, t, y)``.
        diffusion: the :class:`GaussianDiffusion` (schedule, parameterisation, loss) or :class:`EDM` (sigma space).
        sampler: the configured sampler (:mod:`ddlab.diffusion.samplers`) for sample grids and evaluation.
        lr, betas, weight_decay, eps: AdamW settings (``module.*`` in Hydra).
        warmup_steps: linear LR warm-up from 0 over this many optimizer steps.
        lr_schedule: after warm-up, ``constant``, ``cosine`` or ``linear`` decay to
            ``min_lr_ratio * lr`` at ``total_steps`` (defaults to the trainer's max_steps).
        p_uncond: probability of dropping a label to the null class (classifier-free guidance).
        timestep_sampler: ``uniform`` or ``loss_aware``.
        run_config: the resolved run configuration, stored in checkpoints to rebuild the model.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        sampler: Optional[ConfiguredSampler] = None,
        lr: float = 2e-4,
        betas: tuple = (0.9, 0.999),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        total_steps: Optional[int] = None,
        min_lr_ratio: float = 0.0,
        p_uncond: float = 0.1,
        timestep_sampler: str = "uniform",
        run_config: Optional[dict] = None,
    ):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"module.lr must be positive, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"module.warmup_steps must be >= 0, got {warmup_steps}")
        if lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"module.lr_schedule: unknown schedule {lr_schedule!r}; choose from constant, cosine, linear")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"module.p_uncond must lie in [0, 1), got {p_uncond}")
        self.save_hyperparameters(ignore=["model", "diffusion", "sampler"])
        self.model = model
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        self.diffusion = diffusion
        self.sampler = sampler or samplers.ddim()
        self.num_classes = int(getattr(model, "num_classes", 0))
        # EDM (``scheduler=edm``): the formulation draws continuous noise levels itself (log-normal sigma)
        self.sigma_space = hasattr(diffusion, "sample_sigma")
        if self.sigma_space and timestep_sampler != "uniform":
            raise ValueError(
                f"module.timestep_sampler={timestep_sampler} importance-samples discrete timesteps; scheduler=edm draws "
                "sigma from its log-normal (scheduler.P_mean, scheduler.P_std): use module.timestep_sampler=uniform"
            )
        self.timestep_sampler = make_timestep_sampler(timestep_sampler, getattr(diffusion, "num_timesteps", 1))
        self._t_last: Optional[float] = None
        self.skipped_steps = 0

    # ------------------------------------------------------------------ training
    def forward(self, x, t, y=None):
        return self.model(x, t, y)

    def drop_labels(self, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """Replace labels by the null class with probability ``p_uncond``; ``None`` for unconditional models."""
        if self.num_classes == 0:
            return None
        if self.hparams.p_uncond > 0:
            u = torch.rand(y.shape[0], generator=generator).to(y.device)
            y = torch.where(u < self.hparams.p_uncond, torch.full_like(y, self.num_classes), y)
        return y

    def step_generator(self) -> torch.Generator:
        """CPU generator seeded by (run seed, global step, rank): the randomness of a step (timesteps,
        noise, dropped labels) is a pure function of where the step is, so a resumed run draws exactly
        what an uninterrupted one would."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return torch.Generator().manual_seed((seed * 1_000_003 + self.global_step) * 4099 + self.global_rank)

    def training_step(self, batch, batch_idx):
        x, y = batch
        g = self.step_generator()
        y = self.drop_labels(y, g)
        if self.sigma_space:  # EDM: t holds the noise levels sigma
            t = self.diffusion.sample_sigma(x.shape[0], generator=g, device=x.device)
            weights = torch.ones_like(t)
        else:
            t, weights = self.timestep_sampler.sample(x.shape[0], generator=g)
            t, weights = t.to(x.device), weights.to(x.device)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        terms = self.diffusion.training_losses(self.model, x, t, y, noise=noise)
        loss = (terms["loss"] * weights).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}: the run was stopped "
                "and no checkpoint was written over the last good one. Lower module.lr, enable gradient clipping "
                "(trainer.gradient_clip_val) or use trainer.precision=32, then resume from checkpoints/last.ckpt."
            )
        gather = self.all_gather if self.trainer.world_size > 1 else None
        self.timestep_sampler.update(t, terms["loss"], all_gather=gather)
        self._log_terms(terms, t, loss, x.shape[0])
        return loss

    def _log_terms(self, terms: dict, t: torch.Tensor, loss: torch.Tensor, batch_size: int) -> None:
        log = dict(on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, **log)
        self.log("train/mse", terms["mse"].detach().mean(), **log)
        if "vb" in terms:
            self.log("train/vb", terms["vb"].detach().mean(), **log)
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            q = self.diffusion.noise_level_bin(t, 4) if self.sigma_space else (t * 4) // self.diffusion.num_timesteps
            for i in range(4):
                sel = q == i
                if sel.any():
                    self.log(f"train/loss_q{i}", terms["loss"].detach()[sel].mean(), **log)
        now = time.perf_counter()
        if self._t_last is not None:
            dt = now - self._t_last
            if dt > 0:
                self.log("train/images_per_sec", batch_size * self.trainer.world_size / dt, **log)
        self._t_last = now

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            if grads:
                self.log("train/grad_norm", torch.stack(grads).norm(), on_step=True, on_epoch=False)

    def on_train_epoch_start(self) -> None:
        self._t_last = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # fp16 (16-mixed): the grad scaler skips optimizer steps whose gradients are not finite and
        # halves its scale; count those steps so a user sees them.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        scale = float(scaler.get_scale())
        prev = getattr(self, "_last_scale", None)
        if prev is not None and scale < prev:
            self.skipped_steps += 1
        self._last_scale = scale
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        self.log("train/loss_scale", scale, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ validation: held-out denoising loss
    def validation_step(self, batch, batch_idx):
        x, y = batch
        y = y if self.num_classes else None
        g = torch.Generator(device="cpu").manual_seed(1234 + batch_idx)
        if self.sigma_space:
            t = self.diffusion.sample_sigma(x.shape[0], generator=g, device=x.device)
        else:
            t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), generator=g).to(x.device)
        noise = torch.randn(x.shape, generator=g).to(x.device)
        terms = self.diffusion.training_losses(self.ema_model, x, t, y, noise=noise)
        self.log("val/mse", terms["mse"].mean(), on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay, eps=hp.eps)
        total = hp.total_steps
        if total is None and hp.lr_schedule != "constant" and self._trainer is not None:
            est = self.trainer.estimated_stepping_batches  # max_steps, or max_epochs x batches per epoch / accumulation
            total = int(est) if math.isfinite(est) else None
        if hp.lr_schedule != "constant" and not total:
            raise ValueError(
                f"module.lr_schedule={hp.lr_schedule} anneals to module.min_lr_ratio at the last step, which is unknown: "
                "set module.total_steps (or trainer.max_steps / trainer.max_epochs), or use module.lr_schedule=constant for time-budgeted runs"
            )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(hp.warmup_steps, hp.lr_schedule, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["timestep_sampler"] = self.timestep_sampler.state_dict()
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.timestep_sampler.load_state_dict(checkpoint.get("timestep_sampler", {}))
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, y: Optional[torch.Tensor] = None, use_ema: bool = True, generator=None, **kw) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)`` in [-1, 1] with the configured sampler (EMA weights by default)."""
        net = self.ema_model if use_ema else self.model
        shape = (n, net.in_channels, net.image_size, net.image_size)
        was_training = net.training
        net.eval()
        try:
            return self.sampler.sample(net, self.diffusion, shape, y=y, generator=generator, **kw)
        finally:
            net.train(was_training)


class lr_lambda:
    """Multiplier of the base LR at optimizer step ``s``: linear warm-up, then constant, cosine or
    linear decay to ``min_ratio`` at ``total`` steps (constant when ``total`` is unknown; the module
    refuses a non-constant schedule without ``total``)."""

    def __init__(self, warmup: int, schedule: str, total: Optional[int], min_ratio: float = 0.0):
        self.warmup, self.schedule, self.total, self.min_ratio = int(warmup), schedule, total, float(min_ratio)

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant" or not self.total or self.total <= self.warmup:
            return 1.0
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * frac))
        else:
            decay = 1.0 - frac
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def count_parameters(model: nn.Module) -> dict[str, Any]:
    return {"params/total": sum(p.numel() for p in model.parameters()), "params/trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
