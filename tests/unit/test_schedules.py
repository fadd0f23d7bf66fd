"""Schedules against independent float64 computations of the published formulas and diffusers."""

import math

import numpy as np
import pytest
import torch

from ddlab.diffusion import GaussianDiffusion, cosine_betas, linear_betas, make_betas


@pytest.mark.parametrize("T", [1000, 4000, 50, 7])
def test_linear_matches_formula(T):
    scale = 1000 / T
    ref = np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    b = linear_betas(T)
    assert b.dtype == torch.float64
    np.testing.assert_allclose(b.numpy(), ref, rtol=0, atol=1e-15)


@pytest.mark.parametrize("T", [1000, 4000, 50, 7])
def test_cosine_matches_formula(T):
    s = 0.008
    f = [math.cos(((i / T) + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    ref = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)])
    b = cosine_betas(T)
    assert b.dtype == torch.float64
    np.testing.assert_allclose(b.numpy(), ref, rtol=1e-12, atol=1e-15)
    assert b.max() <= 0.999 and b.min() > 0
    # beta is clipped at 0.999 at the end of the schedule; alpha-bar is never clamped
    assert b[-1] == pytest.approx(0.999)
    ab = torch.cumprod(1 - b, 0)
    np.testing.assert_allclose(ab[: T // 2].numpy(), (np.array(f[1 : T // 2 + 1]) / f[0]), rtol=1e-10)


def test_unknown_schedule_names_key():
    with pytest.raises(ValueError, match="scheduler.schedule"):
        make_betas("cosin", 10)


@pytest.mark.parametrize("name,diffusers_name", [("cosine", "squaredcos_cap_v2"), ("linear", "linear")])
def test_alpha_bar_matches_diffusers(name, diffusers_name):
    from diffusers import DDPMScheduler

    d = GaussianDiffusion(schedule=name, num_timesteps=1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(), rtol=1e-5, atol=1e-7)
