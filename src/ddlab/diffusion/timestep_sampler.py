"""Timestep samplers for training: uniform, and loss-aware importance sampling (improved-DDPM)."""

from __future__ import annotations

from typing import Callable, Optional

import torch


class UniformSampler:
    """``t ~ U{0, ..., T-1}`` with unit weights."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, device=None, generator=None):
        """Returns ``(t: (B,) int64, weights: (B,) float32)``; the loss is ``mean(weights * loss_t)``."""
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor, all_gather: Optional[Callable] = None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """Importance sampling of ``t`` proportional to ``sqrt(E[L_t^2])`` (Nichol & Dhariwal 2021, sec. 3.3).

    Keeps the last ``history`` losses per timestep; until every timestep has that many it samples
    uniformly. Then ``p_t ∝ sqrt(mean(L_t^2))``, mixed with ``uniform_prob`` of the uniform
    distribution. Weights ``1 / (T p_t)`` make the weighted loss an unbiased estimate of the
    uniform-``t`` loss. Losses are all-gathered across ranks so every rank holds the same history.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = int(history)
        self.uniform_prob = float(uniform_prob)
        self.loss_history = torch.zeros(self.num_timesteps, self.history_per_term, dtype=torch.float64)
        self.loss_counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().weights()
        w = (self.loss_history**2).mean(dim=-1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch_size: int, device=None, generator=None):
        p = self.weights()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor, all_gather: Optional[Callable] = None) -> None:
        """Record per-sample losses (unweighted) at timesteps ``t``; ``all_gather(tensor)`` returns
        the stacked tensors of every rank (Lightning's ``self.all_gather``)."""
        t = t.detach()
        losses = losses.detach().float()
        if all_gather is not None:
            t = all_gather(t).reshape(-1)
            losses = all_gather(losses).reshape(-1)
        for ti, li in zip(t.cpu().tolist(), losses.cpu().double().tolist()):
            n = int(self.loss_counts[ti])
            if n == self.history_per_term:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, n] = li
                self.loss_counts[ti] = n + 1

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state["loss_history"].shape != self.loss_history.shape:
            raise ValueError(
                f"timestep sampler history has shape {tuple(state['loss_history'].shape)}, expected "
                f"{tuple(self.loss_history.shape)}: the checkpoint was trained with another num_timesteps/history"
            )
        self.loss_history = state["loss_history"].to(torch.float64).clone()
        self.loss_counts = state["loss_counts"].to(torch.long).clone()


def make_timestep_sampler(name: str, num_timesteps: int, **kwargs) -> UniformSampler:
    """``uniform`` or ``loss_aware``."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss_aware":
        return LossAwareSampler(num_timesteps, **kwargs)
    raise ValueError(f"scheduler.timestep_sampler: unknown sampler {name!r}; choose from uniform, loss_aware")
