"""Noise schedules, computed in float64.

All functions return ``betas``: a float64 tensor of shape ``(T,)`` with values in (0, 1).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020) linear schedule, rescaled by ``1000 / T`` so any ``T`` gives the same curve
    (Nichol & Dhariwal 2021, improved-DDPM): ``beta_t = linspace(s * beta_start, s * beta_end, T)``."""
    _check_t(num_timesteps)
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor | float, s: float = 0.008) -> torch.Tensor:
    """Unnormalised cosine alpha-bar, ``f(t) = cos(((t + s) / (1 + s)) * pi / 2) ** 2`` for t in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) eq. 17: ``alpha_bar(t) = f(t) / f(0)`` and
    ``beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta)``; beta is clipped (alpha-bar is
    never clamped), which keeps the end of the schedule from becoming singular."""
    _check_t(num_timesteps)
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = cosine_alpha_bar(steps, s)
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def make_betas(schedule: str, num_timesteps: int) -> torch.Tensor:
    """Betas for a schedule name (``linear`` or ``cosine``)."""
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"scheduler.schedule: unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


def _check_t(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"scheduler.num_timesteps must be a positive integer, got {num_timesteps!r}")
