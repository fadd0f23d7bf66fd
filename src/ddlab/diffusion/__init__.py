"""Diffusion math in plain PyTorch (no Lightning, no Hydra)."""

from .gaussian import GaussianDiffusion
from .likelihood import discretized_gaussian_log_likelihood, normal_kl
from .respace import space_timesteps
from .sampling import Sampler, check_guidance, ddim_step, guided_model_fn
from .schedules import cosine_betas, linear_betas, make_betas
from .timestep_sampler import LossAwareSampler, UniformSampler

__all__ = [
    "GaussianDiffusion",
    "LossAwareSampler",
    "Sampler",
    "UniformSampler",
    "check_guidance",
    "cosine_betas",
    "ddim_step",
    "discretized_gaussian_log_likelihood",
    "guided_model_fn",
    "linear_betas",
    "make_betas",
    "normal_kl",
    "space_timesteps",
]
