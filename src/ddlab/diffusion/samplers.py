"""Samplers as short pure loops, and the builders that ``configs/sampler/*.yaml`` name.

Each loop ``sample_xxx(model_fn, x, schedule, ...)`` keeps its state in local variables and returns
the final ``x``; ``callback(dict)``, when given, sees every step. Two families:

* discrete VP loops (``ddpm``, ``ddim``, ``dpmpp_2m``): ``schedule`` is the respaced
  :class:`~ddlab.diffusion.GaussianDiffusion` and ``model_fn(x, i)`` returns its
  ``p_mean_variance`` dict at step ``i`` (``pred_x0``, ``pred_eps``, ``mean``, ``log_variance``);
* sigma-space loops (``euler``, ``heun``, ``dpmpp_2m_sigma``, ``euler_ancestral``, ``dpmpp_2m_sde``):
  ``schedule`` is the descending float64 noise levels ending with 0, ``model_fn(x, sigma)`` is a
  denoiser returning the x0 estimate at noise level ``sigma`` (a float), and ``x`` starts at
  ``sigma_0`` times standard noise.

A builder (``ddlab.diffusion.samplers.ddim``, ...) takes the settings every sampler of its family
has plus the solver's own, rejects any other key naming the valid ones, and returns a configured
sampler (:mod:`ddlab.diffusion.sampling`). Common keys, discrete: ``steps`` (null: every training
step), ``spacing`` (leading | trailing | linspace), ``step_size``, ``clip_x0``, ``guidance_scale``,
``guidance_batching``, ``guidance_interval``, ``progress``; sigma space: ``steps``, ``schedule`` (karras | model),
``sigma_min``, ``sigma_max`` (null: the model's), ``rho``, ``spacing`` (for ``schedule=model``),
``clip_x0``, ``guidance_scale``, ``guidance_batching``, ``guidance_interval``, ``progress``.
Adding a sampler is one loop and one builder here, and one YAML file.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .sampling import DiscreteSampler, SigmaSampler

DISCRETE_DEFAULTS = dict(steps=50, spacing="trailing", step_size=None, clip_x0=True, guidance_scale=1.0,
                         guidance_batching="auto", guidance_interval=None, progress=True)
SIGMA_DEFAULTS = dict(steps=20, schedule="karras", sigma_min=None, sigma_max=None, rho=7.0, spacing="trailing",
                      clip_x0=True, guidance_scale=1.0, guidance_batching="auto", guidance_interval=None, progress=True)


def _steps(indices, progress: bool, desc: str):
    if not progress:
        return indices
    from tqdm.auto import tqdm

    return tqdm(indices, desc=desc, leave=False)


def _randn(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, device=x.device, generator=generator).to(x.dtype)


# ---------------------------------------------------------------------------- discrete VP loops
def sample_ddpm(model_fn, x, schedule, generator=None, callback=None, progress=False):
    """Ancestral sampling (Ho et al. 2020, algorithm 2) with the model's variance (fixed or learned):
    ``x_{t-1} = mu(x_t, x0_hat) + exp(log_var / 2) z``; the last step returns the mean."""
    for i in _steps(range(schedule.num_timesteps - 1, -1, -1), progress, "ddpm"):
        p = model_fn(x, i)
        x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * _randn(x, generator) if i > 0 else p["mean"]
        if callback:
            callback({"i": i, "t": int(schedule.timestep_map[i]), "x": x, "denoised": p["pred_x0"]})
    return x


def sample_ddim(model_fn, x, schedule, eta=0.0, generator=None, callback=None, progress=False):
    """DDIM (Song et al. 2021, eq. 12): ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z``
    with ``s = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)``. ``eta = 0`` is deterministic;
    ``eta = 1`` is the DDPM ``fixed_small`` step (gmongaras's ``DDIM_scale`` is ``eta``)."""
    for i in _steps(range(schedule.num_timesteps - 1, -1, -1), progress, "ddim"):
        p = model_fn(x, i)
        ab, ab_prev = float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i])
        s = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * p["pred_x0"] + math.sqrt(max(1 - ab_prev - s**2, 0.0)) * p["pred_eps"]
        if s > 0:
            x = x + s * _randn(x, generator)
        if callback:
            callback({"i": i, "t": int(schedule.timestep_map[i]), "x": x, "denoised": p["pred_x0"]})
    return x


def sample_dpmpp_2m(model_fn, x, schedule, generator=None, callback=None, progress=False):
    """DPM-Solver++(2M) over the kept timesteps (Lu et al. 2022, algorithm 2). With
    ``lambda = log(sqrt(ab) / sqrt(1 - ab))`` and ``h = lambda_prev - lambda``:
    ``x_prev = sqrt((1 - ab_prev) / (1 - ab)) x - sqrt(ab_prev) (e^-h - 1) D``, where ``D`` is x0_hat,
    extrapolated after the first step as ``(1 + 1/(2r)) x0_hat - 1/(2r) x0_last``, ``r = h_last / h``.
    The last step (to ``ab_prev = 1``) returns x0_hat. Matches diffusers' DPMSolverMultistepScheduler
    (dpmsolver++, order 2, final sigma 0, ``lower_order_final=False``)."""
    x0_last, h_last = None, None
    for i in _steps(range(schedule.num_timesteps - 1, -1, -1), progress, "dpmpp_2m"):
        x0 = model_fn(x, i)["pred_x0"]
        ab, ab_prev = float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i])
        if ab_prev >= 1:
            x = x0
        else:
            h = 0.5 * (math.log(ab_prev) - math.log1p(-ab_prev)) - 0.5 * (math.log(ab) - math.log1p(-ab))
            d = x0 if x0_last is None else (1 + 0.5 * h / h_last) * x0 - (0.5 * h / h_last) * x0_last
            x = math.sqrt((1 - ab_prev) / (1 - ab)) * x - math.sqrt(ab_prev) * math.expm1(-h) * d
            x0_last, h_last = x0, h
        if callback:
            callback({"i": i, "t": int(schedule.timestep_map[i]), "x": x, "denoised": x0})
    return x


# ---------------------------------------------------------------------------- sigma-space loops
def sample_euler(model_fn, x, schedule, generator=None, callback=None, progress=False):
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM eq. 4)."""
    s = schedule.tolist()
    for i in _steps(range(len(s) - 1), progress, "euler"):
        denoised = model_fn(x, s[i])
        x = x + (s[i + 1] - s[i]) / s[i] * (x - denoised)
        if callback:
            callback({"i": i, "sigma": s[i], "x": x, "denoised": denoised})
    return x


def sample_heun(model_fn, x, schedule, s_churn=0.0, s_tmin=0.0, s_tmax=None, s_noise=1.0, generator=None,
                callback=None, progress=False):
    """Heun's second-order method, EDM algorithm 2: for noise levels in ``[s_tmin, s_tmax]`` first raise
    sigma to ``sigma_hat = sigma (1 + gamma)``, ``gamma = min(s_churn / N, sqrt 2 - 1)``, with fresh noise
    of scale ``s_noise sqrt(sigma_hat^2 - sigma^2)``; then an Euler step corrected with the slope at
    its end point (the step to sigma = 0 stays Euler). NFE = 2N - 1."""
    s = schedule.tolist()
    n = len(s) - 1
    for i in _steps(range(n), progress, "heun"):
        gamma = _heun_gamma(s[i], n, s_churn, s_tmin, s_tmax)
        sigma_hat = s[i] * (1 + gamma)
        if gamma > 0:
            x = x + s_noise * math.sqrt(sigma_hat**2 - s[i] ** 2) * _randn(x, generator)
        denoised = model_fn(x, sigma_hat)
        slope = (x - denoised) / sigma_hat
        x_next = x + (s[i + 1] - sigma_hat) * slope
        if s[i + 1] > 0:
            slope_next = (x_next - model_fn(x_next, s[i + 1])) / s[i + 1]
            x_next = x + (s[i + 1] - sigma_hat) * 0.5 * (slope + slope_next)
        x = x_next
        if callback:
            callback({"i": i, "sigma": s[i], "sigma_hat": sigma_hat, "x": x, "denoised": denoised})
    return x


def _heun_gamma(sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: Optional[float]) -> float:
    """EDM algorithm 2's churn ``gamma`` at noise level ``sigma`` of an ``n``-step schedule."""
    churn = s_tmin <= sigma <= (math.inf if s_tmax is None else s_tmax)
    return min(s_churn / n, math.sqrt(2) - 1) if churn else 0.0


def heun_eval_sigmas(s: list, options: dict) -> list:
    """The noise level of each network evaluation of :func:`sample_heun` over the schedule ``s``:
    ``sigma_hat`` of every step, then the step's end point unless it is 0."""
    n, out = len(s) - 1, []
    for i in range(n):
        out.append(s[i] * (1 + _heun_gamma(s[i], n, options["s_churn"], options["s_tmin"], options["s_tmax"])))
        if s[i + 1] > 0:
            out.append(s[i + 1])
    return out


def sample_dpmpp_2m_sigma(model_fn, x, schedule, generator=None, callback=None, progress=False):
    """DPM-Solver++(2M) in sigma space: with ``h = log(sigma / sigma_next)``,
    ``x_next = (sigma_next / sigma) x - (e^-h - 1) D``, ``D`` extrapolated from the last two denoised
    values as in :func:`sample_dpmpp_2m`; the step to sigma = 0 returns the denoised image. This is
    :func:`sample_dpmpp_2m_sde` with ``eta = 0`` (its midpoint correction is the same extrapolation)."""
    return sample_dpmpp_2m_sde(model_fn, x, schedule, eta=0.0, generator=generator, callback=callback, progress=progress)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)``: an ancestral step goes deterministically to ``sigma_down`` and adds
    noise of scale ``sigma_up``; ``sigma_down^2 + sigma_up^2 = sigma_next^2`` and
    ``sigma_up = eta sigma_next sqrt(1 - sigma_next^2 / sigma^2)`` (the DDPM posterior's, for eta = 1)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(1 - sigma_next**2 / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def sample_euler_ancestral(model_fn, x, schedule, eta=1.0, s_noise=1.0, generator=None, callback=None, progress=False):
    """Euler ancestral (an SDE solver): an Euler step to ``sigma_down``, then fresh noise
    ``s_noise sigma_up z`` (see :func:`ancestral_step`); ``eta = 0`` is plain Euler."""
    s = schedule.tolist()
    for i in _steps(range(len(s) - 1), progress, "euler_ancestral"):
        denoised = model_fn(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x + (down - s[i]) / s[i] * (x - denoised)
        if up > 0:
            x = x + s_noise * up * _randn(x, generator)
        if callback:
            callback({"i": i, "sigma": s[i], "x": x, "denoised": denoised})
    return x


def sample_dpmpp_2m_sde(model_fn, x, schedule, eta=1.0, s_noise=1.0, generator=None, callback=None, progress=False):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, midpoint form): with ``h = log(sigma / sigma_next)``,
    ``x_next = (sigma_next / sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) D0 + (1 - e^(-(1 + eta) h)) / (2r) (D0 - D_last)
    + s_noise sigma_next sqrt(1 - e^(-2 eta h)) z``, ``r = h_last / h``; ``eta = 0`` is the ODE solver."""
    s = schedule.tolist()
    old, h_last = None, None
    for i in _steps(range(len(s) - 1), progress, "dpmpp_2m_sde"):
        denoised = model_fn(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            decay = -math.expm1(-(1 + eta) * h)
            x = (s[i + 1] / s[i]) * math.exp(-eta * h) * x + decay * denoised
            if old is not None:
                x = x + 0.5 * decay * (h / h_last) * (denoised - old)
            if eta > 0:
                x = x + s_noise * s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * _randn(x, generator)
            old, h_last = denoised, h
        if callback:
            callback({"i": i, "sigma": s[i], "x": x, "denoised": denoised})
    return x


# ---------------------------------------------------------------------------- builders (Hydra targets)
def _build(cls, defaults, name, loop, options, kwargs, evals=None, **extra):
    common = {**defaults, **{k: v for k, v in kwargs.items() if k in defaults}}
    unknown = {k: v for k, v in kwargs.items() if k not in defaults}
    if evals is not None:
        extra["evals_per_step"] = evals
    return cls(name, loop, options, {**common, **options}, unknown, **extra)


def _unit(key: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"sampler.{key} must lie in [0, 1], got {value}")
    return float(value)


def ddpm(**kwargs) -> DiscreteSampler:
    """``sampler=ddpm``: :func:`sample_ddpm`; ``steps`` defaults to every training step."""
    return _build(DiscreteSampler, {**DISCRETE_DEFAULTS, "steps": None}, "ddpm", sample_ddpm, {}, kwargs)


def ddim(eta: float = 0.0, **kwargs) -> DiscreteSampler:
    """``sampler=ddim``: :func:`sample_ddim`; ``eta`` in [0, 1] (0 deterministic, 1 DDPM-like)."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"sampler.eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    return _build(DiscreteSampler, DISCRETE_DEFAULTS, "ddim", sample_ddim, {"eta": float(eta)}, kwargs)


def dpmpp_2m(**kwargs) -> DiscreteSampler:
    """``sampler=dpmpp_2m``: :func:`sample_dpmpp_2m` (deterministic, second order; 10-20 steps)."""
    return _build(DiscreteSampler, {**DISCRETE_DEFAULTS, "steps": 20}, "dpmpp_2m", sample_dpmpp_2m, {}, kwargs)


def euler(**kwargs) -> SigmaSampler:
    """``sampler=euler``: :func:`sample_euler` (first order, NFE = steps)."""
    return _build(SigmaSampler, SIGMA_DEFAULTS, "euler", sample_euler, {}, kwargs)


def heun(s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: Optional[float] = None, s_noise: float = 1.0,
         **kwargs) -> SigmaSampler:
    """``sampler=heun``: :func:`sample_heun` (EDM algorithm 2; second order, NFE = 2 steps - 1);
    ``s_tmax`` null means no upper bound."""
    if s_churn < 0 or s_tmin < 0 or s_noise < 0:
        raise ValueError(f"sampler.s_churn, s_tmin and s_noise must be >= 0, got {s_churn}, {s_tmin}, {s_noise}")
    opts = {"s_churn": float(s_churn), "s_tmin": float(s_tmin), "s_tmax": None if s_tmax is None else float(s_tmax),
            "s_noise": float(s_noise)}
    return _build(SigmaSampler, SIGMA_DEFAULTS, "heun", sample_heun, opts, kwargs, evals=lambda n: 2 * n - 1,
                  eval_sigmas=heun_eval_sigmas)


def dpmpp_2m_sigma(**kwargs) -> SigmaSampler:
    """``sampler=dpmpp_2m_sigma``: :func:`sample_dpmpp_2m_sigma` (second order, NFE = steps)."""
    return _build(SigmaSampler, SIGMA_DEFAULTS, "dpmpp_2m_sigma", sample_dpmpp_2m_sigma, {}, kwargs)


def euler_ancestral(eta: float = 1.0, s_noise: float = 1.0, **kwargs) -> SigmaSampler:
    """``sampler=euler_ancestral``: :func:`sample_euler_ancestral`; ``eta`` in [0, 1]."""
    opts = {"eta": _unit("eta", eta), "s_noise": float(s_noise)}
    return _build(SigmaSampler, SIGMA_DEFAULTS, "euler_ancestral", sample_euler_ancestral, opts, kwargs)


def dpmpp_2m_sde(eta: float = 1.0, s_noise: float = 1.0, **kwargs) -> SigmaSampler:
    """``sampler=dpmpp_2m_sde``: :func:`sample_dpmpp_2m_sde`; ``eta`` in [0, 1]."""
    opts = {"eta": _unit("eta", eta), "s_noise": float(s_noise)}
    return _build(SigmaSampler, SIGMA_DEFAULTS, "dpmpp_2m_sde", sample_dpmpp_2m_sde, opts, kwargs)


SAMPLERS = {f.__name__: f for f in (ddpm, ddim, dpmpp_2m, euler, heun, dpmpp_2m_sigma, euler_ancestral, dpmpp_2m_sde)}


def sampler_config(config, name: Optional[str] = None) -> dict:
    """A stored sampler config (a checkpoint's ``run_config["sampler"]``) in builder form
    ``{"_target_": "ddlab.diffusion.samplers.<name>", ...}``. Legacy configs
    (``_target_: ddlab.diffusion.Sampler`` with ``kind``) are mapped as :func:`~ddlab.diffusion.Sampler`
    maps them; ``name`` switches to another sampler, keeping the stored keys that it takes."""
    cfg = dict(config)
    target = str(cfg.pop("_target_", ""))
    if target.endswith(".Sampler"):
        current, eta = cfg.pop("kind", "ddim"), cfg.pop("eta", 0.0)
        if current == "ddim":
            cfg["eta"] = eta
    else:
        current = target.rsplit(".", 1)[-1]
    name = name or current
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    if name != current:
        keys = SAMPLERS[name]().config
        cfg = {k: v for k, v in cfg.items() if k in keys}
    return {"_target_": f"ddlab.diffusion.samplers.{name}", **cfg}
