"""diffusers schedulers as ddlab samplers (``sampler=diffusers sampler.scheduler=EulerDiscreteScheduler``).

:class:`DiffusersSampler` runs any discrete-time (beta-schedule) scheduler that diffusers ships around
a ddlab model ``model(x, t, y)``. The scheduler is configured from the model's own
:class:`~ddlab.diffusion.GaussianDiffusion`, the way diffusers' ``from_config`` carries settings
between schedulers: ``num_train_timesteps`` and ``trained_betas`` (the exact training betas),
``prediction_type`` (``eps`` -> ``epsilon``, ``x0`` -> ``sample``, ``v`` -> ``v_prediction``) and
``timestep_spacing`` (``sampler.spacing``); ``sampler.scheduler_kwargs`` adds the scheduler's own
options (``solver_order``, ``algorithm_type``, ``use_karras_sigmas``, ...).

Classifier-free guidance combines the conditional and null-class outputs with
:func:`ddlab.diffusion.guided_model_fn` before the scheduler sees them. ``clip_x0`` clips the
predicted clean image to [-1, 1] and hands the scheduler the prediction that is consistent with it
(as ddlab's own samplers do), so ``sampler=diffusers sampler.scheduler=DDIMScheduler`` draws the
same images as ``sampler=ddim``. Models with a learned variance (``2C`` output channels) are run with
their first ``C`` channels, the mean prediction; the scheduler's own variance is used.

Plain PyTorch; diffusers is imported when a sampler is built.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ddlab.diffusion import GaussianDiffusion, check_guidance, guided_model_fn
from ddlab.diffusion.guidance import check_guidance_interval, guides_at
from ddlab.diffusion.respace import SPACINGS
from ddlab.diffusion.sigmas import vp_sigmas

try:  # the sampler refactor may move it; both places are fine
    from ddlab.diffusion import resolve_guidance_batching
except ImportError:  # pragma: no cover
    from ddlab.diffusion.sampling import resolve_guidance_batching

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}

# the schedulers the test-suite runs on a tiny model and on the Gaussian oracle
TESTED_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "DEISMultistepScheduler",
)

# settings that come from the checkpoint or from other sampler keys, not from scheduler_kwargs
_OWNED_KEYS = {
    "num_train_timesteps": "the checkpoint's scheduler.num_timesteps",
    "trained_betas": "the checkpoint's betas",
    "beta_schedule": "the checkpoint's betas (trained_betas)",
    "beta_start": "the checkpoint's betas (trained_betas)",
    "beta_end": "the checkpoint's betas (trained_betas)",
    "prediction_type": "the checkpoint's scheduler.prediction",
    "timestep_spacing": "sampler.spacing",
}


def _diffusers():
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("sampler=diffusers needs the diffusers package: pip install diffusers") from e
    return diffusers


def scheduler_class(name: str):
    """The diffusers scheduler class called ``name``; refuses names that are not discrete-time
    beta-schedule schedulers, listing the tested ones."""
    diffusers = _diffusers()
    choices = ", ".join(TESTED_SCHEDULERS)
    try:
        cls = getattr(diffusers, str(name))
    except (AttributeError, ImportError) as e:
        raise ValueError(f"sampler.scheduler: {name!r} is not a diffusers scheduler ({e.__class__.__name__}: {str(e).strip()[:200]}); "
                         f"choose from {choices}") from None
    if not (inspect.isclass(cls) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"sampler.scheduler: {name!r} is not a diffusers scheduler class; choose from {choices}")
    if "trained_betas" not in inspect.signature(cls.__init__).parameters:
        raise ValueError(f"sampler.scheduler: {name} does not take a beta schedule (trained_betas), so it cannot run a "
                         f"ddlab GaussianDiffusion model; choose from {choices}")
    return cls


def scheduler_config(diffusion: GaussianDiffusion, spacing: str = "trailing") -> dict:
    """The diffusers scheduler config that describes ``diffusion`` (what ``from_config`` reads).

    ``clip_sample`` is off: clipping is ddlab's ``clip_x0``, applied before the scheduler's step."""
    variance = "fixed_large" if diffusion.variance == "fixed_large" else "fixed_small"
    return {
        "num_train_timesteps": int(diffusion.num_timesteps),
        "trained_betas": diffusion.betas.double().tolist(),
        "prediction_type": PREDICTION_TYPES[diffusion.prediction],
        "timestep_spacing": spacing,
        "steps_offset": 0,
        "clip_sample": False,
        "variance_type": variance,
    }


def make_scheduler(name: str, diffusion: GaussianDiffusion, spacing: str = "trailing",
                   scheduler_kwargs: Optional[Mapping[str, Any]] = None):
    """``diffusers.<name>.from_config(scheduler_config(diffusion, spacing), **scheduler_kwargs)``,
    passing only the keys the class takes (diffusers would warn about the others)."""
    cls = scheduler_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    config = {k: v for k, v in scheduler_config(diffusion, spacing).items() if k in accepted}
    return cls.from_config(config, **dict(scheduler_kwargs or {}))


def check_scheduler_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Reject options the scheduler does not take, and those ddlab sets from the checkpoint."""
    cls = scheduler_class(name)
    accepted = sorted(set(inspect.signature(cls.__init__).parameters) - {"self"} - set(_OWNED_KEYS))
    for key in kwargs:
        if key in _OWNED_KEYS:
            raise ValueError(f"sampler.scheduler_kwargs.{key}: set by ddlab from {_OWNED_KEYS[key]}; remove it")
        if key not in accepted:
            raise ValueError(f"sampler.scheduler_kwargs.{key}: {name} has no option {key!r}; choose from {', '.join(accepted)}")


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: float) -> float:
    """alpha-bar at a training timestep ``t``; fractional ``t`` (Karras sigmas, Heun's midpoints)
    interpolates log-sigma linearly in ``t``, the inverse of diffusers' sigma -> t mapping."""
    ab = alphas_cumprod.double().cpu()
    t = float(t)
    if t == int(t):
        return float(ab[int(t)])
    lo = min(max(int(math.floor(t)), 0), len(ab) - 1)
    hi = min(lo + 1, len(ab) - 1)
    log_sigma = 0.5 * torch.log((1 - ab) / ab)
    ls = (hi - t) * log_sigma[lo] + (t - lo) * log_sigma[hi] if hi > lo else log_sigma[lo]
    return float(1.0 / (1.0 + torch.exp(2 * ls)))


def clip_prediction(out: torch.Tensor, x_t: torch.Tensor, ab: float, prediction: str) -> torch.Tensor:
    """Clip the clean image implied by ``out`` (an eps / x0 / v prediction at ``x_t``, alpha-bar
    ``ab``) to [-1, 1] and return the prediction of the same kind that implies the clipped image."""
    a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
    if prediction == "x0":
        return out.clamp(-1.0, 1.0)
    x0 = (x_t - s * out) / a if prediction == "eps" else a * x_t - s * out
    x0 = x0.clamp(-1.0, 1.0)
    eps = (x_t - a * x0) / s
    return eps if prediction == "eps" else a * eps - s * x0


class DiffusersSampler:
    """A diffusers scheduler as a ddlab sampler (``sampler=diffusers`` in Hydra).

    Args:
        scheduler: the diffusers class name (``EulerDiscreteScheduler``, ``DPMSolverMultistepScheduler``,
            ...; any discrete-time scheduler that takes ``trained_betas``).
        steps: inference steps (``set_timesteps(steps)``); the model is called once per entry of the
            scheduler's timesteps (``nfe``), e.g. ``2 steps - 1`` times for Heun.
        spacing: ``leading``, ``trailing`` or ``linspace`` (diffusers' ``timestep_spacing``; the same
            names and rules as ddlab's samplers).
        scheduler_kwargs: further options of the scheduler class (``algorithm_type``, ``solver_order``,
            ``use_karras_sigmas``, ``eta`` is not one: DDIM's eta is a ``step`` argument, see ``step_kwargs``).
        step_kwargs: extra arguments of ``scheduler.step`` (e.g. ``{eta: 1.0}`` for DDIMScheduler).
        clip_x0: clip the predicted clean image to [-1, 1] at every step (as ddlab's samplers do).
        guidance_scale: classifier-free guidance weight ``w`` (1 = plain conditional).
        guidance_batching: ``joint``, ``split`` or ``auto`` (see ``ddlab.diffusion.resolve_guidance_batching``).
        guidance_interval: null, or ``[sigma_lo, sigma_hi]``: guide only the network calls at timesteps whose
            noise level ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` lies in ``(sigma_lo, sigma_hi]``, as
            ddlab's samplers do.
        progress: show a progress bar (``False``: none).
    """

    def __init__(self, scheduler: str = "EulerDiscreteScheduler", steps: int = 25, spacing: str = "trailing",
                 scheduler_kwargs: Optional[Mapping[str, Any]] = None, step_kwargs: Optional[Mapping[str, Any]] = None,
                 clip_x0: bool = True, guidance_scale: float = 1.0, guidance_batching: str = "auto",
                 guidance_interval: Optional[Sequence[float]] = None, progress: bool = True):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"sampler.steps must be an integer >= 1, got {steps!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"sampler.spacing: unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
        if guidance_scale < 0:
            raise ValueError(f"sampler.guidance_scale must be >= 0, got {guidance_scale}")
        resolve_guidance_batching(guidance_batching, "cpu")
        self.guidance_interval = check_guidance_interval(guidance_interval)
        self.scheduler_kwargs = {str(k): _plain(v) for k, v in dict(scheduler_kwargs or {}).items()}
        check_scheduler_kwargs(scheduler, self.scheduler_kwargs)
        cls = scheduler_class(scheduler)
        if scheduler == "PNDMScheduler" and spacing != "leading" and not self.scheduler_kwargs.get("skip_prk_steps"):
            raise ValueError(f"sampler.spacing={spacing}: PNDMScheduler's Runge-Kutta warm-up steps assume leading spacing in "
                             "diffusers (its samples diverge otherwise); use sampler.spacing=leading or "
                             "+sampler.scheduler_kwargs.skip_prk_steps=true")
        self.step_kwargs = {str(k): _plain(v) for k, v in dict(step_kwargs or {}).items()}
        step_params = inspect.signature(cls.step).parameters
        for key in self.step_kwargs:
            if key not in step_params or key in ("model_output", "timestep", "sample", "return_dict"):
                valid = [p for p in step_params if p not in ("self", "model_output", "timestep", "sample", "return_dict", "generator")]
                raise ValueError(f"sampler.step_kwargs.{key}: {scheduler}.step has no argument {key!r}; choose from {', '.join(valid)}")
        self._takes_generator = "generator" in step_params
        self.scheduler = scheduler
        self.steps = steps
        self.spacing = spacing
        self.clip_x0 = bool(clip_x0)
        self.guidance_scale = float(guidance_scale)
        self.guidance_batching = guidance_batching
        self.progress = progress
        self._nfe: dict = {}  # steps -> timesteps per run (steps may be changed on the instance)
        self._formulation = None  # the last process sampled (for nfe with a guidance interval)

    @property
    def name(self) -> str:
        return f"diffusers:{self.scheduler}"

    def build(self, diffusion: GaussianDiffusion):
        """A fresh scheduler configured from ``diffusion`` (schedulers keep per-run state)."""
        return make_scheduler(self.scheduler, diffusion, self.spacing, self.scheduler_kwargs)

    def nfe(self, guided: bool = False, diffusion: Optional[GaussianDiffusion] = None) -> int:
        """Network evaluations per image: one per scheduler timestep, twice that with guidance (only
        inside ``guidance_interval`` when one is set, which needs ``diffusion``: the noise levels are its)."""
        if guided and self.guidance_interval is not None:
            diffusion = diffusion if diffusion is not None else self._formulation
            if diffusion is None:
                raise ValueError(f"sampler {self.name}: with a guidance_interval the number of guided forwards depends on "
                                 "the noise levels: call nfe(guided, diffusion)")
            sched = self.build(diffusion)
            sched.set_timesteps(self.steps)
            table = getattr(sched, "alphas_cumprod", diffusion.alphas_cumprod)
            return sum(1 + guides_at(self._sigma(table, float(t)), self.guidance_interval) for t in sched.timesteps)
        if self.steps not in self._nfe:
            s = self.build(GaussianDiffusion(schedule="linear", num_timesteps=1000))
            s.set_timesteps(self.steps)
            self._nfe[self.steps] = int(len(s.timesteps))
        return self._nfe[self.steps] * (2 if guided else 1)

    @staticmethod
    def _sigma(alphas_cumprod: torch.Tensor, t: float) -> float:
        return float(vp_sigmas(torch.tensor(alpha_bar_at(alphas_cumprod, t))))

    def _denoiser(self, guided, plain, prediction: str, alphas_cumprod: torch.Tensor, y, channels: int):
        """The model function the scheduler calls (``guided`` inside the guidance interval, ``plain``
        outside). Clipping uses the scheduler's own alpha-bar table, so the scheduler recovers exactly
        the clipped x0 from the prediction it is handed."""
        def denoise(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tv = t.reshape(()).expand(x_in.shape[0])
            if tv.is_floating_point() and bool((tv == tv.round()).all()):
                tv = tv.long()
            fn = guided if guides_at(self._sigma(alphas_cumprod, float(t)), self.guidance_interval) else plain
            out = fn(x_in, tv, y)[:, :channels]  # learned variance: the mean prediction only
            if self.clip_x0:
                out = clip_prediction(out, x_in, alpha_bar_at(alphas_cumprod, float(t)), prediction)
            return out

        return denoise

    @torch.no_grad()
    def sample(self, model: nn.Module, diffusion: GaussianDiffusion, shape, y=None, noise=None, generator=None,
               guidance_scale=None) -> torch.Tensor:
        """Draw samples ``(B, C, H, W)`` in [-1, 1] (clipped). ``y``: ``(B,)`` labels or None;
        ``noise``: ``x_T ~ N(0, I)`` (scaled by the scheduler's ``init_noise_sigma``)."""
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        check_guidance(model, y, w)
        if self.steps > diffusion.num_timesteps:
            raise ValueError(f"sampler.steps={self.steps} exceeds the model's {diffusion.num_timesteps} training steps")
        device = next(model.parameters()).device
        fn = guided_model_fn(model, w, channels=shape[1], batching=resolve_guidance_batching(self.guidance_batching, device))
        sched = self.build(diffusion)
        sched.set_timesteps(self.steps, device=device)
        x = noise.to(device) if noise is not None else torch.randn(*shape, device=device, generator=generator)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
        if y is not None:
            y = torch.as_tensor(y, device=device, dtype=torch.long)
        table = getattr(sched, "alphas_cumprod", diffusion.alphas_cumprod)
        self._formulation = diffusion
        denoise = self._denoiser(fn, model, diffusion.prediction, table, y, shape[1])
        extra = dict(self.step_kwargs)
        if self._takes_generator:
            extra["generator"] = generator
        x = x * sched.init_noise_sigma
        timesteps = sched.timesteps
        if self.progress:
            from tqdm.auto import tqdm

            timesteps = tqdm(timesteps, desc=f"{self.scheduler} sampling", leave=False)
        for t in timesteps:
            out = denoise(sched.scale_model_input(x, t), t)
            x = sched.step(out, t, x, **extra).prev_sample
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"{self.scheduler} produced non-finite samples with steps={self.steps}: its float32 arithmetic can fail at "
                f"the schedule's largest noise level (sigma_max={float(sched.sigmas.max()) if hasattr(sched, 'sigmas') else 'n/a'}); "
                "use more steps or another scheduler")
        return x.clamp(-1.0, 1.0)

    def __repr__(self) -> str:
        return f"DiffusersSampler({self.scheduler}, steps={self.steps}, spacing={self.spacing}, kwargs={self.scheduler_kwargs})"


def _plain(value):
    """OmegaConf containers (Hydra passes them for dict keys) as plain Python values."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value
