"""EDM: the preconditioned denoiser of Karras et al. 2022 ("Elucidating the Design Space of
Diffusion-Based Generative Models"), as a training formulation beside :class:`GaussianDiffusion`.

The forward process is variance exploding, ``x = x0 + sigma n``, ``n ~ N(0, I)``, over a continuous
noise level ``sigma > 0``. The network ``F`` is wrapped as the denoiser (table 1, "EDM" column)::

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2)      c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)     c_noise = ln(sigma) / 4          (sd = sigma_data)

Training draws ``ln sigma ~ N(P_mean, P_std^2)`` and minimises ``lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2``
with ``lambda = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2``, so the network regresses the target
``(x0 - c_skip x) / c_out`` with unit weight (unit variance for data of standard deviation ``sd``).

ddlab's U-Nets embed a scalar time on the DDPM scale (indices 0..999, sinusoids of periods 2 pi ..
2 pi 10^4), on which ``c_noise`` in about [-1.6, 1.1] would reach only the fastest frequencies. The
network is therefore called as ``model(c_in x, time_scale * c_noise + time_offset, y)``; the defaults
(250, 500) put sigma in [0.002, 80] at 112..774 and the training bulk (``ln sigma`` within 3 ``P_std``
of ``P_mean``) at 200..650. ``time_scale=1, time_offset=0`` gives the paper's ``c_noise`` unchanged.
Every coefficient is computed in float64 from ``sigma`` and cast to the data's dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .likelihood import mean_flat

ModelFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

_OPTIONS = ("sigma_data", "P_mean", "P_std", "sigma_min", "sigma_max", "time_scale", "time_offset")


class EDM:
    """The EDM formulation: preconditioning, log-normal noise levels and the loss weight.

    Args (``scheduler.*`` with ``scheduler=edm``):
        sigma_data: standard deviation of the data (0.5 for images in [-1, 1]).
        P_mean, P_std: training noise levels ``ln sigma ~ N(P_mean, P_std^2)``.
        sigma_min, sigma_max: the noise range a sampler covers (the formulation itself accepts any
            ``sigma >= 0``); samplers read them as attributes.
        time_scale, time_offset: the network's time input is ``time_scale * ln(sigma) / 4 + time_offset``
            (see the module docstring).

    The network ``model(x, t, y) -> (B, C, H, W)`` is any ddlab model with ``C`` output channels (no
    learned variance); ``y`` are labels or the null class, which the training module drops with
    ``p_uncond`` exactly as for :class:`GaussianDiffusion`. Classifier-free guidance is linear in the
    network output, hence in ``D``: pass ``guided_model_fn(net, w)`` as ``model`` to :meth:`denoise`.
    """

    def __init__(self, **options):
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"scheduler: unknown option(s) {', '.join(unknown)} for scheduler=edm; choose from {', '.join(_OPTIONS)}")
        o = dict(sigma_data=0.5, P_mean=-1.2, P_std=1.2, sigma_min=0.002, sigma_max=80.0, time_scale=250.0, time_offset=500.0)
        o.update(options)
        for key in _OPTIONS:
            value = o[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"scheduler.{key} must be a finite number, got {value!r}")
            o[key] = float(value)
        for key in ("sigma_data", "P_std", "sigma_min", "time_scale"):
            if o[key] <= 0:
                raise ValueError(f"scheduler.{key} must be positive, got {o[key]}")
        if not o["sigma_max"] > o["sigma_min"]:
            raise ValueError(f"scheduler.sigma_max ({o['sigma_max']}) must exceed scheduler.sigma_min ({o['sigma_min']})")
        self.sigma_data, self.P_mean, self.P_std = o["sigma_data"], o["P_mean"], o["P_std"]
        self.sigma_min, self.sigma_max = o["sigma_min"], o["sigma_max"]
        self.time_scale, self.time_offset = o["time_scale"], o["time_offset"]

    # ------------------------------------------------------------------ table 1
    def _sigma64(self, sigma, batch: int, device) -> torch.Tensor:
        """``sigma`` (scalar or ``(B,)``) as a ``(B,)`` float64 tensor on ``device`` (float32 on MPS, which
        has no float64); rejects negative or non-finite levels."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64
        s = torch.as_tensor(sigma).to(device=device, dtype=dtype)
        if s.ndim == 0:
            s = s.expand(batch)
        if s.shape != (batch,):
            raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {tuple(s.shape)}")
        if not bool(((s >= 0) & torch.isfinite(s)).all()):
            raise ValueError("sigma must be finite and >= 0")
        return s

    def coefficients(self, sigma: torch.Tensor) -> dict:
        """``c_skip, c_out, c_in, c_noise`` and the loss weight ``weight`` at ``sigma`` (float64, any shape)."""
        sd = self.sigma_data
        s = torch.as_tensor(sigma)
        s = s.float() if s.device.type == "mps" else s.double()
        r = (s**2 + sd**2).sqrt()
        return {
            "c_skip": sd**2 / r**2,
            "c_out": s * sd / r,
            "c_in": 1.0 / r,
            "c_noise": s.log() / 4.0,
            "weight": r**2 / (s * sd) ** 2,
        }

    def time_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's time argument ``time_scale * ln(sigma) / 4 + time_offset`` (float32, shape of ``sigma``).
        ``sigma = 0`` is clamped to 1e-20 (its ``c_out`` is 0, so the network output is not used)."""
        s = torch.as_tensor(sigma)
        s = (s.float() if s.device.type == "mps" else s.double()).clamp(min=1e-20)
        return (self.time_scale * s.log() / 4.0 + self.time_offset).float()

    # ------------------------------------------------------------------ denoiser
    def denoise(self, model: ModelFn, x: torch.Tensor, sigma, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``D(x; sigma)`` for ``x: (B, C, H, W)`` at noise level ``sigma`` (scalar or ``(B,)``, >= 0),
        labels ``y: (B,)`` or None. Returns the denoised estimate of ``x0``, shaped and typed like ``x``.
        At ``sigma = 0`` it returns ``x`` (``c_skip = 1``, ``c_out = 0``)."""
        s = self._sigma64(sigma, x.shape[0], x.device)
        c = self.coefficients(s)
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        view = (-1,) + (1,) * (x.ndim - 1)
        c_skip, c_out, c_in = (c[k].to(dtype).reshape(view) for k in ("c_skip", "c_out", "c_in"))
        out = model((c_in * x).to(x.dtype), self.time_input(s).to(x.device), y)
        if out.shape != x.shape:
            raise ValueError(
                f"scheduler=edm needs a network output shaped like its input {tuple(x.shape)}, got {tuple(out.shape)} "
                "(EDM has no learned variance: build the model with out_channels = data.channels)"
            )
        return (c_skip * x + c_out * out).to(x.dtype)

    # ------------------------------------------------------------------ training
    def sample_sigma(self, batch: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """Training noise levels ``exp(P_mean + P_std z)``, ``z ~ N(0, 1)``: ``(batch,)`` float32 on
        ``device``; drawn on the generator's device (CPU by default), so a seeded CPU generator gives
        the same levels on any device."""
        gdev = generator.device if generator is not None else "cpu"
        z = torch.randn(batch, generator=generator, device=gdev, dtype=torch.float64)
        return (self.P_mean + self.P_std * z).exp().float().to(device if device is not None else gdev)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` (float64)."""
        return self.coefficients(sigma)["weight"]

    def training_losses(self, model: ModelFn, x0: torch.Tensor, sigma: torch.Tensor, y: Optional[torch.Tensor] = None,
                        noise: Optional[torch.Tensor] = None) -> dict:
        """Per-sample terms for ``x0: (B, C, H, W)`` in [-1, 1] at noise levels ``sigma: (B,) > 0``.

        Returns ``(B,)`` tensors: ``mse``, the unweighted ``mean ||D(x0 + sigma n; sigma) - x0||^2``
        over pixels, and ``loss = lambda(sigma) * mse`` (what is optimised; EDM eq. 2 with eq. 8)."""
        if noise is None:
            noise = torch.randn_like(x0)
        s = self._sigma64(sigma, x0.shape[0], x0.device)
        if not bool((s > 0).all()):
            raise ValueError("training noise levels sigma must be > 0 (the EDM weight is infinite at 0)")
        x = x0 + s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1))) * noise
        denoised = self.denoise(model, x, s, y)
        mse = mean_flat((denoised.float() - x0.float()) ** 2)
        return {"loss": mse * self.loss_weight(s).to(mse.dtype), "mse": mse}

    def noise_level_bin(self, sigma: torch.Tensor, bins: int = 4) -> torch.Tensor:
        """Index ``0..bins-1`` of the training distribution's quantile bin holding ``sigma`` (0 = least
        noise), for per-noise-level loss logs: ``floor(bins * Phi((ln sigma - P_mean) / P_std))``."""
        s = torch.as_tensor(sigma).detach().float()  # on its own device: no host read in the training step
        z = (s.log() - self.P_mean) / self.P_std
        u = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        return (u * bins).floor().clamp(0, bins - 1).long()

    # ------------------------------------------------------------------ likelihood
    bits_per_dim_error = (
        "bits/dim is not defined for scheduler=edm in ddlab (its likelihood is the discrete variational bound of "
        "GaussianDiffusion); turn it off with callbacks.bpd.every_n_epochs=0, and use ddlab.nll only on checkpoints "
        "trained with a GaussianDiffusion scheduler (linear, cosine, cosine_v, cosine_learned)"
    )

    def calc_bpd_loop(self, *args, **kwargs):
        """Not defined: ddlab's bits/dim is the discrete VP variational bound of :class:`GaussianDiffusion`."""
        raise NotImplementedError(self.bits_per_dim_error)

    def __repr__(self) -> str:
        return (
            f"EDM(sigma_data={self.sigma_data}, P_mean={self.P_mean}, P_std={self.P_std}, sigma_min={self.sigma_min}, "
            f"sigma_max={self.sigma_max}, time_scale={self.time_scale}, time_offset={self.time_offset})"
        )
