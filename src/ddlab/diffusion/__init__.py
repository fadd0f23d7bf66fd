"""Diffusion math in plain PyTorch (no Lightning, no Hydra)."""

from . import samplers
from .edm import EDM as EDM  # re-exported (scheduler=edm)
from .gaussian import GaussianDiffusion
from .guidance import GUIDANCE_BATCHING, check_guidance, guided_model_fn, resolve_guidance_batching
from .likelihood import discretized_gaussian_log_likelihood, normal_kl
from .respace import space_timesteps
from .samplers import SAMPLERS
from .sampling import ConfiguredSampler, DiscreteSampler, Sampler, SigmaSampler
from .schedules import cosine_betas, linear_betas, make_betas
from .sigmas import VPDenoiser, as_denoiser, karras_sigmas
from .timestep_sampler import LossAwareSampler, UniformSampler

__all__ = [
    "ConfiguredSampler",
    "DiscreteSampler",
    "GUIDANCE_BATCHING",
    "GaussianDiffusion",
    "LossAwareSampler",
    "SAMPLERS",
    "Sampler",
    "SigmaSampler",
    "UniformSampler",
    "VPDenoiser",
    "as_denoiser",
    "check_guidance",
    "cosine_betas",
    "discretized_gaussian_log_likelihood",
    "guided_model_fn",
    "karras_sigmas",
    "linear_betas",
    "make_betas",
    "normal_kl",
    "resolve_guidance_batching",
    "samplers",
    "space_timesteps",
]
