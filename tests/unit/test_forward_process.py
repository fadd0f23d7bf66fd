"""Forward process and posterior against closed forms computed independently in float64."""

import numpy as np
import pytest
import torch

from ddlab.diffusion import GaussianDiffusion


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_q_sample_moments(schedule, t):
    d = GaussianDiffusion(schedule=schedule, num_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((x0.shape[0],), t), noise)
    ab = float(np.prod(1 - d.betas.numpy()[: t + 1]))
    n = x0.shape[0]
    # mean within 5 standard errors, variance within 5 standard errors (chi-square)
    assert abs(xt.mean().item() - np.sqrt(ab) * 0.7) < 5 * np.sqrt((1 - ab) / n)
    assert abs(xt.var().item() - (1 - ab)) < 5 * (1 - ab) * np.sqrt(2 / n)


def test_posterior_matches_bayes():
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on q(x_{t-1}|x_0) and q(x_t|x_{t-1}), in float64."""
    d = GaussianDiffusion(schedule="cosine", num_timesteps=100)
    betas = d.betas.numpy()
    ab = np.cumprod(1 - betas)
    rng = np.random.default_rng(0)
    for t in [1, 5, 50, 99]:
        x0, xt = rng.normal(size=2)
        # prior N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}), likelihood x_t | x_{t-1} ~ N(sqrt(1-b_t) x_{t-1}, b_t)
        m0, v0 = np.sqrt(ab[t - 1]) * x0, 1 - ab[t - 1]
        a = np.sqrt(1 - betas[t])
        prec = 1 / v0 + a**2 / betas[t]
        var = 1 / prec
        mean = var * (m0 / v0 + a * xt / betas[t])
        tt = torch.tensor([t])
        m, v, lv = d.q_posterior_mean_variance(torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), tt)
        assert m.item() == pytest.approx(mean, rel=1e-10, abs=1e-12)
        assert v.item() == pytest.approx(var, rel=1e-10)
        assert lv.item() == pytest.approx(np.log(var), rel=1e-10)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_invert(prediction):
    d = GaussianDiffusion(num_timesteps=1000, prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 990, 999])
    xt = d.q_sample(x0, t, eps)
    target = d._target(x0, eps, t)
    x0_hat, eps_hat = d.output_to_x0_eps(target, xt, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-6, atol=1e-6 if prediction != "eps" else 1e-3)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-6, atol=1e-6 if prediction != "x0" else 1e-3)
