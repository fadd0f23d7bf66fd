"""Timestep samplers for training: uniform, and loss-aware importance sampling (improved-DDPM).

Chosen with ``timestep_sampler=uniform|loss_aware`` (``configs/timestep_sampler/*.yaml``), built as
``module.timestep_sampler`` (a ``_partial_`` target called with ``num_timesteps``). Both draw on the
device of the generator they are given and never copy to the host, so a training step that uses them
does not synchronise with the GPU.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class UniformSampler:
    """``t ~ U{0, ..., T-1}`` with unit weights."""

    def __init__(self, num_timesteps: int):
        if int(num_timesteps) < 1:
            raise ValueError(f"scheduler.num_timesteps must be a positive integer, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> torch.Tensor:
        """``(T,)`` probabilities of each timestep."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None):
        """Returns ``(t: (B,) int64, weights: (B,) float32)``; the loss is ``mean(weights * loss_t)``."""
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor, all_gather: Optional[Callable] = None) -> None:
        """Record per-sample losses at timesteps ``t`` (nothing to record for the uniform sampler)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """Importance sampling of ``t`` proportional to ``sqrt(E[L_t^2])`` (Nichol & Dhariwal 2021, sec. 3.3).

    Args:
        num_timesteps: ``T`` (from the diffusion).
        history: losses kept per timestep (a ring buffer); until every timestep has that many the
            sampler is uniform.
        uniform_prob: weight of the uniform distribution mixed into ``p_t ∝ sqrt(mean(L_t^2))``.

    Weights ``1 / (T p_t)`` make the weighted loss an unbiased estimate of the uniform-``t`` loss.
    Losses are all-gathered across ranks so every rank holds the same history. The history lives on
    the device of the losses it records, as a ring buffer per timestep; updates are vectorised (no
    per-sample host loop). :attr:`loss_history` and the state dict list each row oldest first.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if int(history) < 1:
            raise ValueError(f"module.timestep_sampler.history must be a positive integer, got {history}")
        if not 0.0 <= float(uniform_prob) <= 1.0:
            raise ValueError(f"module.timestep_sampler.uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)
        # one spare column takes the losses that a batch overwrites within the same update
        self._buf = torch.zeros(self.num_timesteps, self.history + 1, dtype=torch.float64)
        self.loss_counts = torch.zeros(self.num_timesteps, dtype=torch.long)
        self.next_slot = torch.zeros(self.num_timesteps, dtype=torch.long)

    @property
    def loss_history(self) -> torch.Tensor:
        """``(T, history)`` recorded losses per timestep, oldest first (unfilled slots are 0, at the end)."""
        j = torch.arange(self.history, device=self._buf.device)
        full = (self.loss_counts == self.history)[:, None]
        return self._buf.gather(1, torch.where(full, (self.next_slot[:, None] + j) % self.history, j))

    @loss_history.setter
    def loss_history(self, value: torch.Tensor) -> None:
        self._buf = torch.zeros_like(self._buf)
        self._buf[:, : self.history] = value.to(self._buf.device, torch.float64)
        self.next_slot = torch.zeros_like(self.next_slot)  # oldest first: the next write replaces column 0

    def _to(self, device) -> None:
        if device is not None and self._buf.device != torch.device(device):
            self._buf, self.loss_counts, self.next_slot = (v.to(device) for v in (self._buf, self.loss_counts, self.next_slot))

    def warmed_up(self) -> torch.Tensor:
        """0-d bool tensor (not a Python bool: reading it would synchronise)."""
        return (self.loss_counts == self.history).all()

    def weights(self) -> torch.Tensor:
        uniform = torch.full_like(self.loss_counts, 1.0, dtype=torch.float64) / self.num_timesteps
        w = (self._buf[:, : self.history] ** 2).mean(dim=-1).sqrt()  # the order within a row does not matter
        w = w / w.sum().clamp_min(torch.finfo(torch.float64).tiny)
        w = w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return torch.where(self.warmed_up(), w, uniform)

    def sample(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None):
        """Inverse-CDF draw from :meth:`weights` (``searchsorted``, no host round trip)."""
        self._to(device if device is not None else (generator.device if generator is not None else None))
        p = self.weights()
        cdf = p.cumsum(0)
        u = torch.rand(batch_size, device=p.device, generator=generator, dtype=torch.float64) * cdf[-1]
        t = torch.searchsorted(cdf, u, right=True).clamp_(max=self.num_timesteps - 1)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor, all_gather: Optional[Callable] = None) -> None:
        """Record per-sample losses (unweighted) at timesteps ``t``, in batch order; ``all_gather(tensor)``
        returns the stacked tensors of every rank (Lightning's ``self.all_gather``)."""
        t, losses = t.detach().reshape(-1), losses.detach().double().reshape(-1)
        if all_gather is not None:
            t, losses = all_gather(t).reshape(-1), all_gather(losses).reshape(-1)
        self._to(t.device)
        h = self.history
        ts, order = torch.sort(t, stable=True)
        rank = torch.arange(ts.numel(), device=ts.device) - torch.searchsorted(ts, ts)  # position within its timestep
        # losses per timestep in this batch (index_add_, not bincount: on CUDA bincount reads max(t) back to the host)
        k = torch.zeros_like(self.loss_counts).index_add_(0, ts, torch.ones_like(ts))
        start = torch.where(self.loss_counts < h, self.loss_counts, self.next_slot)  # a full row: its oldest slot
        slot = (start[ts] + rank) % h
        slot = torch.where(rank >= k[ts] - h, slot, h)  # older than the last h of this batch: the spare column
        self._buf.index_put_((ts, slot), losses[order])
        self.loss_counts = (self.loss_counts + k).clamp_(max=h)
        self.next_slot = (start + k) % h

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.cpu().clone(), "loss_counts": self.loss_counts.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if tuple(state["loss_history"].shape) != tuple(self.loss_history.shape):
            raise ValueError(
                f"timestep sampler history has shape {tuple(state['loss_history'].shape)}, expected "
                f"{tuple(self.loss_history.shape)}: the checkpoint was trained with another "
                "scheduler.num_timesteps or module.timestep_sampler.history"
            )
        self.loss_history = state["loss_history"]  # oldest first
        self.loss_counts = state["loss_counts"].to(self._buf.device, torch.long).clone()
