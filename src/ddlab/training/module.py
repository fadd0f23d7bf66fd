"""The Lightning module for the denoising objective.

A training step is: draw its randomness on the model's device (label drops, timesteps, noise) ->
losses -> log. Nothing in a step that is not logged reads a device value on the host; see
"Host-work audit of the training step" in docs/design.md.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torchmetrics import MeanMetric

from ddlab.diffusion import ConfiguredSampler, GaussianDiffusion, UniformSampler, samplers

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite. The message is complete advice for this run (which
    settings to change, which checkpoint to resume from) and is meant to be shown on its own."""


class DiffusionModule(pl.LightningModule):
    """Trains ``model`` to denoise under ``diffusion``; keeps an EMA copy for sampling.

    Every argument is a key of ``module:`` in ``configs/train.yaml``:

    Args:
        model: the network ``model(x, t, y)``.
        diffusion: the :class:`GaussianDiffusion` (schedule, parameterisation, loss) or :class:`EDM` (sigma space).
        sampler: the configured sampler (:mod:`ddlab.diffusion.samplers`) for sample grids and evaluation.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (a ``_partial_`` target, AdamW by default).
        lr_scheduler: ``lr_scheduler(optimizer) -> LRScheduler`` stepped every optimizer step (a ``_partial_``
            target, :func:`ddlab.training.lr_schedule.warmup_decay` by default), or ``None`` for a fixed LR.
            When it has a ``total_steps`` argument left ``None``, the trainer's estimate is filled in
            (``trainer.max_steps``, or max_epochs x batches per epoch / accumulation).
        timestep_sampler: ``timestep_sampler(num_timesteps)`` (a ``_partial_`` target of
            :class:`UniformSampler` or :class:`LossAwareSampler`).
        p_uncond: probability of dropping a label to the null class (classifier-free guidance).
        run_config: the resolved run configuration, stored in checkpoints to rebuild the model.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        sampler: Optional[ConfiguredSampler] = None,
        optimizer: Callable[..., torch.optim.Optimizer] = functools.partial(torch.optim.AdamW, lr=2e-4),
        lr_scheduler: Optional[Callable[..., Any]] = None,
        timestep_sampler: Callable[[int], UniformSampler] = UniformSampler,
        p_uncond: float = 0.1,
        run_config: Optional[dict] = None,
    ):
        super().__init__()
        lr = (getattr(optimizer, "keywords", None) or {}).get("lr")
        if lr is not None and not lr > 0:
            raise ValueError(f"module.optimizer.lr must be positive, got {lr}")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"module.p_uncond must lie in [0, 1), got {p_uncond}")
        self.save_hyperparameters(ignore=["model", "diffusion", "sampler", "optimizer", "lr_scheduler", "timestep_sampler"])
        self.model = model
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        self.diffusion = diffusion
        self.sampler = sampler or samplers.ddim()
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._time_decays, self._budget_timer = [], None  # decay_over=time lambdas and their clock (on_train_start)
        self.num_classes = int(getattr(model, "num_classes", 0))
        # EDM (``scheduler=edm``): the formulation draws continuous noise levels itself (log-normal sigma)
        self.sigma_space = hasattr(diffusion, "sample_sigma")
        if self.sigma_space and not (timestep_sampler is UniformSampler or getattr(timestep_sampler, "func", None) is UniformSampler):
            raise ValueError(
                "timestep_sampler=loss_aware importance-samples discrete timesteps; scheduler=edm draws sigma from its "
                "log-normal (scheduler.P_mean, scheduler.P_std): use timestep_sampler=uniform"
            )
        self.timestep_sampler = timestep_sampler(getattr(diffusion, "num_timesteps", 1))
        # synced across ranks at epoch end; no NaN check per batch (it would read the batch back to the host)
        self.val_mse = MeanMetric(nan_strategy="disable")
        self._generator: Optional[torch.Generator] = None
        self._first_nonfinite: Optional[torch.Tensor] = None  # device: first global step with a non-finite loss, or -1
        self._skipped: Any = 0  # device tensor once counting: optimizer steps the fp16 grad scaler skipped
        self._last_scale: Optional[torch.Tensor] = None
        self._throughput: Optional[Throughput] = None

    # ------------------------------------------------------------------ training
    def forward(self, x, t, y=None):
        return self.model(x, t, y)

    def drop_labels(self, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """Replace labels by the null class with probability ``p_uncond``; ``None`` for unconditional models."""
        if self.num_classes == 0:
            return None
        if self.hparams.p_uncond > 0:
            u = torch.rand(y.shape[0], generator=generator, device=y.device)
            y = torch.where(u < self.hparams.p_uncond, torch.full_like(y, self.num_classes), y)
        return y

    def step_generator(self, device: torch.device) -> torch.Generator:
        """Generator on ``device`` seeded by (run seed, global step, rank): the randomness of a step
        (timesteps, noise, dropped labels) is a pure function of where the step is, so a resumed run draws
        exactly what an uninterrupted one would. Reseeding a device generator is host-only (no copy)."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._generator.manual_seed((seed * 1_000_003 + self.global_step) * 4099 + self.global_rank)

    def training_step(self, batch, batch_idx):
        x, y = batch
        # 1. the step's randomness, on the model's device
        g = self.step_generator(x.device)
        y = self.drop_labels(y, g)
        if self.sigma_space:  # EDM: t holds the noise levels sigma
            t = self.diffusion.sample_sigma(x.shape[0], generator=g, device=x.device)
            weights = torch.ones_like(t)
        else:
            t, weights = self.timestep_sampler.sample(x.shape[0], device=x.device, generator=g)
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        # 2. losses
        terms = self.diffusion.training_losses(self.model, x, t, y, noise=noise)
        loss = (terms["loss"] * weights).mean()
        self._watch_nonfinite(loss)
        if not self.sigma_space:
            gather = self.all_gather if self.trainer.world_size > 1 else None
            self.timestep_sampler.update(t, terms["loss"], all_gather=gather)
        # 3. log (device tensors; Lightning reads them on logged steps only)
        self._log_terms(terms, t, loss, x.shape[0])
        return loss

    def _is_log_step(self) -> bool:
        return self.global_step % max(1, self.trainer.log_every_n_steps) == 0

    def _log_terms(self, terms: dict, t: torch.Tensor, loss: torch.Tensor, batch_size: int) -> None:
        log = dict(on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, **log)
        if not self._is_log_step():
            return
        self.log("train/mse", terms["mse"].detach().mean(), **log)
        if "vb" in terms:
            self.log("train/vb", terms["vb"].detach().mean(), **log)
        # loss per quarter of the timestep range, without a host-side mask (NaN for an empty quarter)
        q = self.diffusion.noise_level_bin(t, 4) if self.sigma_space else (t * 4) // self.diffusion.num_timesteps
        per_q = torch.zeros(4, device=t.device).index_add_(0, q, terms["loss"].detach().float())
        per_q = per_q / torch.zeros(4, device=t.device).index_add_(0, q, torch.ones_like(per_q[q]))
        for i in range(4):
            self.log(f"train/loss_q{i}", per_q[i], **log)

    def on_train_start(self) -> None:
        """Finds the LR schedule's ``decay_over=time`` lambdas once (stepped from Lightning's ``Timer`` in
        :meth:`on_train_batch_start`); without a time budget they decay over the run's steps instead."""
        from lightning.pytorch.callbacks import Timer

        self._time_decays = [fn for cfg in (getattr(self.trainer, "lr_scheduler_configs", None) or [])
                             for fn in getattr(cfg.scheduler, "lr_lambdas", []) if getattr(fn, "decay_over", None) == "time"]
        self._budget_timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if not self._time_decays or self._budget_timer is not None:
            return
        est = self.trainer.estimated_stepping_batches  # no time budget: decay over the run's steps, if known
        if not math.isfinite(est):
            raise ValueError("module.lr_scheduler.decay_over=time decays over trainer.max_time, which is not set (nor "
                             "trainer.max_steps / max_epochs): set trainer.max_time (e.g. 00:00:10:00) or use decay_over=steps")
        log.info("module.lr_scheduler.decay_over=time without trainer.max_time: decaying over the run's %d steps", int(est))
        for fn in self._time_decays:
            fn.decay_over, fn.total_steps = "steps", int(est)
        self._time_decays = []

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._time_decays:  # the share of the time budget spent, from Lightning's Timer (restored on resume)
            elapsed, left = self._budget_timer.time_elapsed("train"), self._budget_timer.time_remaining("train")
            for fn in self._time_decays:
                fn.time_fraction = elapsed / max(elapsed + left, 1e-9)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._is_log_step():
            norms = grad_norm(self.model, norm_type=2)
            if norms:
                self.log("train/grad_norm", norms["grad_2.0_norm_total"], on_step=True, on_epoch=False)

    def on_train_epoch_start(self) -> None:
        # images/s over the last log interval of this epoch (host clock: the window spans a logged step,
        # whose logging synchronises, so host and device time agree over the window)
        window = max(2, min(100, self.trainer.log_every_n_steps + 1))
        self._throughput = Throughput(world_size=self.trainer.world_size, window_size=window)
        self._epoch_t0, self._epoch_batches = time.perf_counter(), 0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._throughput is not None:
            self._epoch_batches += 1
            n = int(batch[0].shape[0])
            self._throughput.update(time=time.perf_counter() - self._epoch_t0, batches=self._epoch_batches,
                                    samples=self._epoch_batches * n)
            rate = self._throughput.compute().get("device/samples_per_sec")
            if rate is not None and self._is_log_step():
                self.log("train/images_per_sec", rate * self.trainer.world_size, on_step=True, on_epoch=False)
        self._count_skipped_steps()

    def _count_skipped_steps(self) -> None:
        """fp16 (16-mixed): the grad scaler skips optimizer steps whose gradients are not finite and lowers
        its scale; count those steps on the device (reading the scale with ``get_scale()`` would sync)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
            return
        scale = scaler._scale.detach().reshape(())
        if self._last_scale is not None:
            self._skipped = self._skipped + (scale < self._last_scale).long()
        self._last_scale = scale.clone()
        if self._is_log_step():
            self.log("train/skipped_steps", torch.as_tensor(self._skipped, device=scale.device).float(), on_step=True, on_epoch=False)
            self.log("train/loss_scale", scale, on_step=True, on_epoch=False)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped by the fp16 grad scaler so far (reads the device counter)."""
        return int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped = int(value)

    # ------------------------------------------------------------------ non-finite loss
    def _watch_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is NaN/inf in a device tensor; read it (one sync) on logged
        steps, before every checkpoint and at the end of training."""
        if self._first_nonfinite is None or self._first_nonfinite.device != loss.device:
            self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first_nonfinite < 0)
        self._first_nonfinite = torch.where(bad, torch.full_like(self._first_nonfinite, self.global_step), self._first_nonfinite)
        if self._is_log_step():
            self.check_finite()

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` on every rank if any rank had a non-finite loss so far (called
        on all ranks at the same points, so the reduction under DDP is a matched collective)."""
        if self._first_nonfinite is None:
            return
        first = self._first_nonfinite
        if getattr(self.trainer, "world_size", 1) > 1:  # the earliest bad step of any rank
            never = torch.iinfo(torch.long).max
            first = self.trainer.strategy.reduce(torch.where(first < 0, never, first), reduce_op="min")
            first = torch.where(first == never, -1, first)
        if (step := int(first)) >= 0:
            raise NonFiniteLossError(self._nonfinite_message(step))

    def _nonfinite_message(self, step: int) -> str:
        tr = self.trainer
        fixes = []
        lr = (getattr(self.optimizer_factory, "keywords", None) or {}).get("lr")
        fixes.append(f"lower module.optimizer.lr (now {lr})" if lr is not None else "lower the learning rate (module.optimizer.lr)")
        if not getattr(tr, "gradient_clip_val", None):
            fixes.append("clip gradients with trainer.gradient_clip_val=1.0")
        precision = str(getattr(tr, "precision", "32-true"))
        if precision not in ("32-true", "64-true", "32", "64"):
            fixes.append(f"train in full precision with trainer.precision=32-true (now {precision})")
        ckpt = self._newest_checkpoint()
        resume = (f"then resume with ckpt_path={ckpt}, the newest checkpoint, written before the loss diverged"
                  if ckpt else "no checkpoint was written before the loss diverged, so start a new run")
        return (f"The training loss became NaN or infinite at global step {step}; the run stopped and wrote no "
                f"checkpoint after that step. To fix it: {'; '.join(fixes)}; {resume}.")

    def _newest_checkpoint(self) -> Optional[Path]:
        found = []
        for cb in getattr(self.trainer, "checkpoint_callbacks", []) or []:
            d = getattr(cb, "dirpath", None)
            if d and Path(d).is_dir():
                found += [p for p in Path(d).glob("*.ckpt") if p.is_file()]
        if not found and getattr(self.trainer, "ckpt_path", None):
            found = [Path(self.trainer.ckpt_path)]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    def on_train_end(self) -> None:
        self.check_finite()

    # ------------------------------------------------------------------ validation: held-out denoising loss
    def validation_step(self, batch, batch_idx):
        x, y = batch
        y = y if self.num_classes else None
        g = torch.Generator(device=x.device).manual_seed(1234 + batch_idx)
        if self.sigma_space:
            t = self.diffusion.sample_sigma(x.shape[0], generator=g, device=x.device)
        else:
            t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), generator=g, device=x.device)
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        terms = self.diffusion.training_losses(self.ema_model, x, t, y, noise=noise)
        self.val_mse.update(terms["mse"])
        self.log("val/mse", self.val_mse, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        sched = self.lr_scheduler_factory(opt, **self._total_steps_kwarg(self.lr_scheduler_factory))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _total_steps_kwarg(self, factory) -> dict:
        """``{"total_steps": n}`` when the schedule takes ``total_steps``, the config left it null and the
        trainer knows the run's length; else ``{}``."""
        try:
            param = inspect.signature(factory).parameters.get("total_steps")
        except (TypeError, ValueError):
            return {}
        if param is None or param.default is not None or self._trainer is None:
            return {}
        est = self.trainer.estimated_stepping_batches
        return {"total_steps": int(est)} if math.isfinite(est) else {}

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never write weights that a non-finite step has touched
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


def count_parameters(model: nn.Module) -> dict[str, Any]:
    return {"params/total": sum(p.numel() for p in model.parameters()), "params/trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
