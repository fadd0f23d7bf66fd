"""Noise levels in sigma space: the Karras schedule and the VP-to-sigma denoiser wrapper.

In sigma space (Karras et al. 2022, "EDM") a noisy image is ``x = x0 + sigma n`` and a *denoiser*
``D(x, sigma, y) ~ E[x0 | x]`` is all a sampler needs. A discrete VP process
(:class:`~ddlab.diffusion.GaussianDiffusion`, ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``) is the same
family rescaled: ``sigma = sqrt((1 - ab) / ab)`` and ``x_t = x / sqrt(1 + sigma^2)``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# D(x, sigma) -> x0 estimate; sigma is a 0-d or (B,) tensor
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The ``n`` noise levels of EDM eq. 5, from ``sigma_max`` down to ``sigma_min``, then a final 0:
    ``sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    Returns a float64 tensor of length ``n + 1``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sampler.steps must be an integer >= 1, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sampler.sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"sampler.rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The noise levels ``sigma = sqrt((1 - ab) / ab)`` of a VP process's alpha-bars, in float64."""
    ab = torch.as_tensor(alphas_cumprod).to(torch.float64)
    return ((1 - ab) / ab).sqrt()


class VPDenoiser:
    """A discrete VP process seen as a sigma-space formulation, so sigma-space samplers run on any
    :class:`~ddlab.diffusion.GaussianDiffusion` checkpoint (k-diffusion's discrete wrapper, written anew).

    ``denoise(model, x, sigma, y)`` calls ``model(x / sqrt(1 + sigma^2), t, y)`` where ``t`` is the
    continuous training timestep whose log-sigma is linearly interpolated between the two training
    steps around ``log sigma`` (as diffusers' Euler/Heun schedulers do), takes the first ``C`` output
    channels (learned variance is dropped) and turns the eps / x0 / v prediction into ``x0``:
    ``eps: x - sigma eps``; ``x0: x0``; ``v: x / (1 + sigma^2) - sigma v / sqrt(1 + sigma^2)``.
    """

    def __init__(self, diffusion):
        self.sigmas = vp_sigmas(diffusion.alphas_cumprod)  # ascending with the step index
        self.log_sigmas = self.sigmas.log()
        self.timesteps = diffusion.timestep_map.to(torch.float64)  # training index of each step
        self.prediction = diffusion.prediction
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous training timestep ``(B,)`` float64 (on the CPU) for noise levels ``sigma: (B,)``;
        clamped to the trained range."""
        ls, ts = self.log_sigmas, self.timesteps
        log_s = sigma.detach().to("cpu", torch.float64).clamp(min=1e-10).log()
        if len(ls) == 1:
            return ts[torch.zeros_like(log_s, dtype=torch.long)]
        hi = torch.searchsorted(ls, log_s).clamp(1, len(ls) - 1)
        lo = hi - 1
        w = ((log_s - ls[lo]) / (ls[hi] - ls[lo])).clamp(0, 1)
        return ts[lo] + w * (ts[hi] - ts[lo])

    def denoise(self, model, x: torch.Tensor, sigma: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``D(x, sigma, y)``: ``x: (B, C, H, W)`` at noise ``sigma: (B,)``; returns the x0 estimate.
        Coefficients are computed in float64 on the CPU and cast (never to half) when applied."""
        s = sigma.detach().to("cpu", torch.float64).reshape(-1)
        c_in = (1 + s**2).rsqrt()
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

        def col(v: torch.Tensor) -> torch.Tensor:
            return v.to(x.device, dtype).reshape(-1, *([1] * (x.ndim - 1)))

        out = model(x * col(c_in), self.sigma_to_t(s).to(x.device, dtype), y)[:, : x.shape[1]]
        if self.prediction == "eps":
            return x - col(s) * out
        if self.prediction == "x0":
            return out
        return col(c_in**2) * x - col(s * c_in) * out


def as_denoiser(formulation):
    """The sigma-space view of a formulation: an object with ``denoise(model, x, sigma, y)`` and
    ``sigma_min`` / ``sigma_max`` (e.g. EDM) is used as is; a discrete VP process (anything with
    ``alphas_cumprod``, i.e. :class:`~ddlab.diffusion.GaussianDiffusion`) is wrapped in :class:`VPDenoiser`."""
    if hasattr(formulation, "alphas_cumprod"):
        return VPDenoiser(formulation)
    if callable(getattr(formulation, "denoise", None)) and hasattr(formulation, "sigma_min") and hasattr(formulation, "sigma_max"):
        return formulation
    raise TypeError(
        f"{type(formulation).__name__} is neither a discrete VP process (alphas_cumprod) nor a sigma-space "
        "formulation (denoise(model, x, sigma, y), sigma_min, sigma_max)"
    )
