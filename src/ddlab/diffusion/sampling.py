"""A configured sampler: one loop of :mod:`ddlab.diffusion.samplers` plus its settings.

``hydra.utils.instantiate(cfg.sampler)`` calls a builder of :mod:`ddlab.diffusion.samplers`
(``ddlab.diffusion.samplers.ddim``, ``...euler``, ...) and gets one of the objects below. They hold
no state between calls: :meth:`ConfiguredSampler.sample` wraps the network for guidance, draws the
start noise and runs the pure loop. Two kinds:

* :class:`DiscreteSampler` (``ddpm``, ``ddim``, ``dpmpp_2m``): steps over a respaced subset of the
  training timesteps of a discrete VP process (:class:`~ddlab.diffusion.GaussianDiffusion`).
* :class:`SigmaSampler` (``euler``, ``heun``, ``dpmpp_2m_sigma``, ``euler_ancestral``, ``dpmpp_2m_sde``):
  steps over noise levels sigma (Karras schedule or the model's own) with a denoiser ``D(x, sigma)``;
  works on any formulation (EDM directly, ``GaussianDiffusion`` through :class:`~ddlab.diffusion.sigmas.VPDenoiser`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .guidance import GUIDANCE_BATCHING, check_guidance, guided_model_fn, resolve_guidance_batching  # noqa: F401 (old imports)
from .guidance import check_guidance_interval, guides_at
from .respace import SPACINGS, space_timesteps
from .sigmas import as_denoiser, karras_sigmas, vp_sigmas

SCHEDULES = ("karras", "model")


def _int_or_none(key: str, value, what: str):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"sampler.{key} must be {what}, got {value!r}")


class ConfiguredSampler:
    """Settings shared by every sampler; ``options`` are the solver's own (e.g. ``eta``).

    Attributes read by callers: ``name``, ``steps``, ``guidance_scale``, ``guidance_batching``,
    ``guidance_interval``, ``progress`` (False: no progress bar at all), ``config`` (the builder's
    arguments, as in YAML). ``guidance_interval = [sigma_lo, sigma_hi]`` guides only the network
    evaluations at noise levels ``sigma_lo < sigma <= sigma_hi`` (the others run one unguided forward);
    null guides every evaluation.
    """

    space = ""  # "discrete" or "sigma"

    def __init__(self, name: str, loop: Callable, options: dict, config: dict, unknown: dict, evals_per_step: Callable):
        if unknown:
            valid = ", ".join(sorted(config))
            raise ValueError(f"sampler.{sorted(unknown)[0]}: not an option of sampler {name!r}; valid options: {valid}")
        self.name, self.loop, self.options, self.config = name, loop, dict(options), dict(config)
        self._evals = evals_per_step
        self._formulation = None  # the last process sampled or checked (for nfe with a guidance interval)
        self.steps = config["steps"]
        self.clip_x0 = bool(config["clip_x0"])
        self.guidance_scale = float(config["guidance_scale"])
        self.guidance_batching = config["guidance_batching"]
        self.guidance_interval = check_guidance_interval(config["guidance_interval"])
        self.progress = bool(config["progress"])
        if self.guidance_scale < 0:
            raise ValueError(f"sampler.guidance_scale must be >= 0, got {self.guidance_scale}")
        resolve_guidance_batching(self.guidance_batching, "cpu")  # validate the name now, not at the first sample

    def replace(self, **changes) -> "ConfiguredSampler":
        """A copy with some builder arguments changed (``sampler.replace(steps=10, progress=False)``);
        the public attributes callers may have set (``guidance_scale``, ``progress``, ...) carry over."""
        from . import samplers

        keys = ("steps", "clip_x0", "guidance_scale", "guidance_batching", "guidance_interval", "progress")
        current = {k: getattr(self, k) for k in keys}
        if current["guidance_interval"] is not None:
            current["guidance_interval"] = list(current["guidance_interval"])
        return samplers.SAMPLERS[self.name](**{**self.config, **current, **changes})

    def nfe(self, guided: bool, diffusion=None) -> int:
        """Network forwards per image for one :meth:`sample` call (guidance's extra pass counted, only
        inside ``guidance_interval`` when one is set). ``diffusion`` is needed when the count depends on
        the process (``steps=null``, ``step_size`` or a guidance interval) and nothing was sampled yet."""
        if diffusion is not None:
            self._check(diffusion)
        evals = self._evals(self._num_steps())
        if not guided or self.guidance_interval is None:
            return evals * (2 if guided else 1)
        if self._formulation is None:
            raise ValueError(f"sampler {self.name}: with a guidance_interval the number of guided forwards depends on "
                             "the noise levels: call nfe(guided, diffusion)")
        return evals + sum(guides_at(s, self.guidance_interval) for s in self.eval_sigmas(self._formulation))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({self.name}: {args})"

    @torch.no_grad()
    def sample(self, model: nn.Module, diffusion, shape, y=None, noise=None, generator=None, guidance_scale=None,
               callback=None) -> torch.Tensor:
        """Draw samples ``(B, C, H, W)`` in [-1, 1] (clamped). ``y``: ``(B,)`` labels or None;
        ``noise``: the standard-normal start ``(B, C, H, W)`` (drawn with ``generator`` when None);
        ``callback(dict)`` sees every step's state (``x``, ``denoised``, ``i`` and ``t`` or ``sigma``)."""
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        check_guidance(model, y, w)
        self._check(diffusion)
        device = next(model.parameters()).device
        guided = guided_model_fn(model, w, channels=shape[1], batching=resolve_guidance_batching(self.guidance_batching, device))
        interval = self.guidance_interval

        def fn_at(sigma: float):  # the network function for an evaluation at noise level sigma
            return guided if guides_at(sigma, interval) else model

        x = noise.to(device) if noise is not None else torch.randn(*shape, device=device, generator=generator)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
        if y is not None:
            y = torch.as_tensor(y, device=device, dtype=torch.long)
        return self._run(fn_at, diffusion, x, y, generator, callback).clamp(-1.0, 1.0)

    def _check(self, diffusion) -> None:
        self._formulation = diffusion

    def eval_sigmas(self, diffusion) -> list[float]:
        """The noise level of each network evaluation of one :meth:`sample` call, in order."""
        raise NotImplementedError


class DiscreteSampler(ConfiguredSampler):
    """Samples a discrete VP process over ``steps`` of its training timesteps (``spacing``, or every
    ``step_size``-th step); ``clip_x0`` clamps the predicted x0 to [-1, 1] at every step."""

    space = "discrete"

    def __init__(self, name, loop, options, config, unknown, evals_per_step=lambda n: n):
        super().__init__(name, loop, options, config, unknown, evals_per_step)
        _int_or_none("steps", self.steps, "an integer >= 1 (or null for every training step)")
        _int_or_none("step_size", config["step_size"], "a positive integer or null")
        if config["spacing"] not in SPACINGS:
            raise ValueError(f"sampler.spacing: unknown spacing {config['spacing']!r}; choose from {', '.join(SPACINGS)}")
        self.spacing, self.step_size = config["spacing"], config["step_size"]
        self._num_timesteps = None

    def _check(self, diffusion) -> None:
        if not hasattr(diffusion, "alphas_cumprod"):
            raise ValueError(
                f"sampler {self.name!r} steps through the timesteps of a discrete VP process (GaussianDiffusion), "
                f"which {type(diffusion).__name__} is not; use a sigma-space sampler: sampler=euler, sampler=heun, "
                "sampler=dpmpp_2m_sigma, sampler=euler_ancestral or sampler=dpmpp_2m_sde"
            )
        self._formulation, self._num_timesteps = diffusion, diffusion.num_timesteps

    def respaced(self, diffusion):
        """The process over the kept timesteps (the training process itself when all are kept)."""
        kept = space_timesteps(diffusion.num_timesteps, self.steps, self.spacing, self.step_size)
        return diffusion if len(kept) == diffusion.num_timesteps else diffusion.respace(kept)

    def _num_steps(self) -> int:
        if self.step_size is None and self.steps is not None:
            return self.steps
        if self._num_timesteps is None:
            raise ValueError(f"sampler {self.name}: with steps=null or step_size the number of steps depends on the "
                             "training T: call nfe(guided, diffusion)")
        return len(space_timesteps(self._num_timesteps, self.steps, self.spacing, self.step_size))

    def eval_sigmas(self, diffusion) -> list[float]:
        return vp_sigmas(self.respaced(diffusion).alphas_cumprod).flip(0).tolist()

    def _run(self, fn_at, diffusion, x, y, generator, callback):
        d = self.respaced(diffusion)
        sigmas = vp_sigmas(d.alphas_cumprod).tolist()  # by step index

        def model_fn(x_t: torch.Tensor, i: int) -> dict:
            t = torch.full((x_t.shape[0],), i, device=x_t.device, dtype=torch.long)
            return d.p_mean_variance(fn_at(sigmas[i]), x_t, t, y, clip_x0=self.clip_x0)

        return self.loop(model_fn, x, d, generator=generator, callback=callback, progress=self.progress, **self.options)


class SigmaSampler(ConfiguredSampler):
    """Samples in sigma space over ``steps`` noise levels: ``schedule=karras`` (EDM eq. 5 with ``rho``;
    ``sigma_min`` / ``sigma_max`` null take the formulation's) or ``schedule=model`` (the model's own
    training sigmas at ``steps`` timesteps chosen by ``spacing``; discrete VP processes only).
    ``clip_x0`` clamps the denoiser's output to [-1, 1]."""

    space = "sigma"

    def __init__(self, name, loop, options, config, unknown, evals_per_step=lambda n: n, eval_sigmas=None):
        super().__init__(name, loop, options, config, unknown, evals_per_step)
        self._eval_sigmas = eval_sigmas  # (sigmas, options) -> the sigma of each evaluation; None: one per step
        _int_or_none("steps", self.steps, "an integer >= 1")
        if self.steps is None:
            raise ValueError("sampler.steps must be an integer >= 1 for sigma-space samplers, got None")
        if config["schedule"] not in SCHEDULES:
            raise ValueError(f"sampler.schedule: unknown schedule {config['schedule']!r}; choose from {', '.join(SCHEDULES)}")
        if config["spacing"] not in SPACINGS:
            raise ValueError(f"sampler.spacing: unknown spacing {config['spacing']!r}; choose from {', '.join(SPACINGS)}")
        self.schedule, self.spacing, self.rho = config["schedule"], config["spacing"], float(config["rho"])
        self.sigma_min, self.sigma_max = config["sigma_min"], config["sigma_max"]

    def _num_steps(self) -> int:
        return self.steps

    def sigmas(self, denoiser) -> torch.Tensor:
        """The float64 noise levels, descending, ending with 0 (``steps + 1`` values)."""
        if self.schedule == "karras":
            lo = float(self.sigma_min if self.sigma_min is not None else denoiser.sigma_min)
            hi = float(self.sigma_max if self.sigma_max is not None else denoiser.sigma_max)
            return karras_sigmas(self.steps, lo, hi, self.rho)
        own = getattr(denoiser, "sigmas", None)
        if own is None:
            raise ValueError(f"sampler.schedule=model needs a formulation with discrete training sigmas; "
                             f"{type(denoiser).__name__} has none: use sampler.schedule=karras")
        kept = space_timesteps(len(own), self.steps, self.spacing)
        return torch.cat([own[kept].flip(0), torch.zeros(1, dtype=torch.float64)])

    def eval_sigmas(self, diffusion) -> list[float]:
        s = self.sigmas(as_denoiser(diffusion)).tolist()
        return s[:-1] if self._eval_sigmas is None else self._eval_sigmas(s, self.options)

    def _run(self, fn_at, diffusion, x, y, generator, callback):
        den = as_denoiser(diffusion)
        sigmas = self.sigmas(den)  # float64 on the CPU; the loops read them as Python floats
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

        def denoiser(x_s: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((x_s.shape[0],), float(sigma), device=x_s.device, dtype=dtype)
            out = den.denoise(fn_at(sigma), x_s, s, y)
            return out.clamp(-1.0, 1.0) if self.clip_x0 else out

        return self.loop(denoiser, x * float(sigmas[0]), sigmas, generator=generator, callback=callback,
                         progress=self.progress, **self.options)


def Sampler(kind: str = "ddim", steps: Optional[int] = 50, eta: float = 0.0, spacing: str = "trailing",
            step_size: Optional[int] = None, clip_x0: bool = True, guidance_scale: float = 1.0,
            guidance_batching: str = "auto", progress: bool = True) -> DiscreteSampler:
    """The sampler config of checkpoints written before samplers had their own builders
    (``_target_: ddlab.diffusion.Sampler``, ``kind: ddim|ddpm|dpmpp_2m``): maps onto
    ``ddlab.diffusion.samplers.<kind>``. ``eta`` goes to ``ddim`` only (old ``ddpm`` / ``dpmpp_2m``
    configs stored an unused ``eta``, which is checked and dropped). New code and configs use the builders."""
    from . import samplers

    legacy = ("ddpm", "ddim", "dpmpp_2m")
    if kind not in legacy:
        raise ValueError(f"sampler.kind: unknown sampler {kind!r}; choose from {', '.join(legacy)}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"sampler.eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    common = dict(steps=steps, spacing=spacing, step_size=step_size, clip_x0=clip_x0, guidance_scale=guidance_scale,
                  guidance_batching=guidance_batching, progress=progress)
    return samplers.SAMPLERS[kind](**common, **({"eta": eta} if kind == "ddim" else {}))

