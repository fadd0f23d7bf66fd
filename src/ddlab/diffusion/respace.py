"""Choosing a subset of the training timesteps to sample with."""

from __future__ import annotations

from typing import Optional

import numpy as np

SPACINGS = ("leading", "trailing", "linspace")


def space_timesteps(
    num_timesteps: int,
    steps: Optional[int] = None,
    spacing: str = "trailing",
    step_size: Optional[int] = None,
) -> list[int]:
    """Ascending list of kept training timesteps (0-based) for sampling.

    * ``steps=None`` and ``step_size=None``: all ``T`` steps.
    * ``spacing=leading``  (diffusers): ``[0, k, 2k, ...]`` with ``k = T // steps``.
    * ``spacing=trailing`` (diffusers, Lin et al. 2023): ``round(arange(T, 0, -T / steps)) - 1``; always
      keeps ``T - 1``, so sampling starts from the noisiest step.
    * ``spacing=linspace`` (diffusers): ``round(linspace(0, T - 1, steps))``.
    * ``step_size=k`` (gmongaras/Diffusion_models_from_scratch): every k-th step counted down from
      ``T - 1`` (``T-1, T-1-k, ...``); it overrides ``steps``.
    """
    if step_size is not None:
        if int(step_size) < 1:
            raise ValueError(f"sampler.step_size must be a positive integer, got {step_size}")
        return sorted(range(num_timesteps - 1, -1, -int(step_size)))
    if steps is None or steps == num_timesteps:
        return list(range(num_timesteps))
    if not isinstance(steps, int) or steps < 1 or steps > num_timesteps:
        raise ValueError(f"sampler.steps must be an integer in [1, {num_timesteps}] (the training T), got {steps!r}")
    if spacing == "leading":
        ratio = num_timesteps // steps
        ts = np.arange(0, steps) * ratio
    elif spacing == "trailing":
        ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    else:
        raise ValueError(f"sampler.spacing: unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    kept = sorted(set(int(t) for t in ts))
    if len(kept) != steps:
        raise ValueError(f"sampler.spacing={spacing} gives {len(kept)} distinct steps for steps={steps}, T={num_timesteps}")
    return kept
