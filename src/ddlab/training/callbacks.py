"""Callbacks: EMA of the weights, sample grids, atomic checkpoint writes."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities import rank_zero_only


class EMA(Callback):
    """Exponential moving average of ``pl_module.model`` into ``pl_module.ema_model`` after every
    optimizer step (the EMA weights live in the module's state dict, so checkpoints carry them).

    ``decay_t = clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, decay)`` when ``warmup`` is on
    (diffusers/Karras warm-up: early averages forget the random init quickly), else ``decay``.
    Updates start after ``start_step`` steps and happen every ``update_every`` steps.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, inv_gamma: float = 1.0, power: float = 2 / 3,
                 min_decay: float = 0.0, update_every: int = 1, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must lie in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"callbacks.ema.update_every must be >= 1, got {update_every}")
        self.decay = decay
        self.warmup = warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_decay = min_decay
        self.update_every = update_every
        self.start_step = start_step
        self._last_step = -1

    def decay_at(self, step: int) -> float:
        """Decay used for the update after optimizer step ``step`` (1-based count of steps taken)."""
        n = step - self.start_step
        if n <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        value = 1.0 - (1.0 + n / self.inv_gamma) ** (-self.power)
        return max(self.min_decay, min(value, self.decay))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 and trainer.ckpt_path is None:
            pl_module.ema_model.load_state_dict(pl_module.model.state_dict())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # restored by now (on_fit_start runs before the loops are restored)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step this batch (gradient accumulation)
            return
        self._last_step = step
        if step % self.update_every:
            return
        d = self.decay_at(step)
        ema_p = [p for p in pl_module.ema_model.parameters()]
        src_p = [p.detach() for p in pl_module.model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for eb, sb in zip(pl_module.ema_model.buffers(), pl_module.model.buffers()):
            eb.copy_(sb)
        if step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("train/ema_decay", d, on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "power": self.power, "inv_gamma": self.inv_gamma}


class SampleGrid(Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, draw ``n`` samples with the
    EMA weights and the run's sampler and guidance (through :mod:`ddlab.evaluation`, seed ``seed``),
    save ``samples/step_NNNNNN.png`` in the run directory and send the grid to the loggers that take
    images. Class-conditional models get labels ``0, 1, ..., num_classes-1`` repeated (one class per
    column)."""

    def __init__(self, dirpath: str, every_n_steps: int = 500, n: int = 64, seed: int = 0, at_end: bool = True):
        if every_n_steps < 0 or n < 1:
            raise ValueError(f"callbacks.sample_grid.every_n_steps must be >= 0 and callbacks.sample_grid.n >= 1, got {every_n_steps}, {n}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.n = n
        self.seed = seed
        self.at_end = at_end
        self._last_saved = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_saved:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step != self._last_saved:
            self.save(trainer, pl_module)

    @rank_zero_only
    def save(self, trainer, pl_module) -> Path:
        from ddlab import evaluation as ev
        from ddlab.training.fid_callback import run_sampler

        step = trainer.global_step
        self._last_saved = step
        k = pl_module.num_classes
        sampler = run_sampler(pl_module)
        labels = ev.make_labels(list(range(min(k, self.n))), self.n, k) if k else None
        w = float(sampler.guidance_scale) if k else 1.0
        net = pl_module.ema_model
        was_training = net.training
        net.eval()
        try:
            images = ev.generate_uint8(net, pl_module.diffusion, sampler, self.n, self.n, labels=labels, guidance_scale=w, seed=self.seed)
        finally:
            net.train(was_training)
        nrow = k if k and self.n % k == 0 else int(self.n**0.5)
        path = ev.save_grid(images, self.dirpath / f"step_{step:06d}.png", nrow=nrow)
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):  # TensorBoard: the grid file as written
                import numpy as np
                from PIL import Image

                with Image.open(path) as im:
                    exp.add_image("samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")
            elif hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="samples", images=[str(path)], step=step, caption=[f"step {step}"])
        return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint through :func:`ddlab.io.atomic_write` (a temporary file in the same
    folder, fsynced, renamed into place), so a kill or a failed write (disk full, a folder that became
    read-only) leaves the previous file intact; such a failure stops the run with an ``OSError`` that
    names the folder, the space the checkpoint needs and the space that is free."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        from ddlab.io import atomic_write, disk_error

        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise disk_error(e, path) from e
        with atomic_write(path, needed=_tensor_bytes(checkpoint)) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise RuntimeError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); use another file, e.g. an earlier step in the same folder") from e


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about the size of its file."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class RNGState(Callback):
    """Saves and restores the global RNG states (python, numpy, torch CPU and CUDA) with the
    checkpoint, for whatever randomness is not drawn from the per-step generator (e.g. dropout)."""

    def state_dict(self) -> dict:
        import random

        import numpy as np

        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        import random

        import numpy as np

        if not state:
            return
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class StepCheckpoint(Checkpoint):
    """Checkpoints by optimizer step, written atomically (see :class:`AtomicCheckpointIO`).

    A :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning runs it after every other
    callback: the saved state includes this step's EMA update.

    Writes ``step_NNNNNN.ckpt`` every ``every_n_steps`` steps (keeping the newest ``keep``; ``-1``
    keeps all, ``0`` none) and always refreshes ``last.ckpt``, also when training ends (max_steps,
    max_time, or end of data). Nothing is written after an exception such as a non-finite loss, so
    the last good checkpoint stays as it was.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 500, keep: int = 2, save_last: bool = True):
        if every_n_steps < 0:
            raise ValueError(f"callbacks.checkpoint.every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.save_last = save_last
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return "StepCheckpoint"

    def _save(self, trainer: pl.Trainer, last_only: bool = False) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if not last_only and self.every_n_steps and step % self.every_n_steps == 0 and self.keep != 0:
            trainer.save_checkpoint(self.dirpath / f"step_{step:06d}.ckpt")
            self._prune(trainer)
        if self.save_last or last_only:
            trainer.save_checkpoint(self.dirpath / "last.ckpt")

    def _prune(self, trainer) -> None:
        if self.keep < 0 or not trainer.is_global_zero:
            return
        files = sorted(self.dirpath.glob("step_*.ckpt"))
        for f in files[: max(0, len(files) - self.keep)]:
            f.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and self.every_n_steps and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0:
            self._save(trainer)


class BitsPerDim(Callback):
    """The variational bound of the EMA model in bits/dim (Ho et al. eq. 5, discretised decoder at
    t = 0) on the first ``num_images`` images of the data module's reference split, every
    ``every_n_epochs`` epochs at the end of validation, through :func:`ddlab.evaluation.bits_per_dim`
    (the numbers of ``ddlab.nll n=<num_images>`` for the same ``seed``); logs ``val/bpd``,
    ``val/bpd_prior``, ``val/bpd_decoder`` and ``val/bpd_vb`` (the sum of the t > 0 terms). Each
    image costs T network calls, so keep ``num_images`` small; under DDP the images are split across
    ranks and the sums reduced. Class-conditional models are conditioned on the true labels.
    ``every_n_epochs=0`` is off. The training RNG is not touched (the noise has its own generators)."""

    def __init__(self, every_n_epochs: int = 0, num_images: int = 64, batch_size: int = 64, seed: int = 0):
        if every_n_epochs < 0 or num_images < 1 or batch_size < 1:
            raise ValueError("callbacks.bpd.every_n_epochs must be >= 0 and callbacks.bpd.num_images, callbacks.bpd.batch_size "
                             f">= 1, got {every_n_epochs}, {num_images}, {batch_size}")
        self.every_n_epochs, self.num_images, self.batch_size, self.seed = int(every_n_epochs), int(num_images), int(batch_size), int(seed)
        self._last_epoch = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and getattr(pl_module.diffusion, "bits_per_dim_error", None):  # EDM: before any step
            raise ValueError(pl_module.diffusion.bits_per_dim_error)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ddlab import evaluation as ev

        if not self.every_n_epochs or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if trainer.current_epoch == self._last_epoch:
            return
        self._last_epoch = trainer.current_epoch
        ds = trainer.datamodule.reference_dataset()
        mine = range(trainer.global_rank, min(self.num_images, len(ds)), trainer.world_size)
        net = pl_module.ema_model
        was_training = net.training
        net.eval()
        try:
            terms = ev.bits_per_dim(net, pl_module.diffusion, ds, mine, self.batch_size, seed=self.seed)
        finally:
            net.train(was_training)
        keys = ("bpd", "bpd_prior", "bpd_decoder", "bpd_vb")
        sums = torch.tensor([float(terms[k].sum()) for k in keys] + [len(mine)], dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        n = max(float(sums[-1]), 1.0)
        for j, k in enumerate(keys):
            pl_module.log(f"val/{k}", float(sums[j]) / n, on_epoch=True, sync_dist=False)
