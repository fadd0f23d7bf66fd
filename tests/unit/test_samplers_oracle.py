"""Sigma-space samplers on Gaussian data, whose optimal denoiser is known in closed form.

For x0 ~ N(mu, Sigma) and x = x0 + sigma n, E[x0 | x] = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu).
The probability-flow ODE is then linear and solvable: in the eigenbasis of Sigma (eigenvalues lam),
``x(sigma) - mu = sqrt((lam + sigma^2) / (lam + sigma_max^2)) (x(sigma_max) - mu)``.
The oracle is a *formulation* in the EDM sense (``denoise(model, x, sigma, y)``, ``sigma_min``,
``sigma_max``), so these tests also exercise the sampler's dispatch to such objects.
"""

import numpy as np
import pytest
import torch
from torch import nn

from ddlab.diffusion import samplers

MU = torch.tensor([-0.3, 0.1, 0.25, 0.0], dtype=torch.float64)
_A = torch.tensor([[0.5, 0, 0, 0], [0.2, 0.4, 0, 0], [-0.1, 0.2, 0.3, 0], [0.0, 0.1, -0.2, 0.45]], dtype=torch.float64)
SIGMA = _A @ _A.T  # full covariance, eigenvalues 0.04 .. 0.34
SHAPE = (1, 2, 2)  # D = 4 as a (C, H, W) image
N = 2000


class GaussianFormulation:
    """EDM-style formulation whose denoiser is the exact posterior mean of N(MU, SIGMA) data."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        self.lam, self.q = torch.linalg.eigh(SIGMA)
        self.calls = 0

    def denoise(self, model, x, sigma, y=None):
        self.calls += 1
        b = x.shape[0]
        z = _matmul(x.reshape(b, -1) - MU, self.q)
        s2 = sigma.to(torch.float64).view(-1, 1) ** 2
        return (MU + _matmul(self.lam / (self.lam + s2) * z, self.q.T)).reshape(x.shape).to(x.dtype)


def _matmul(a, b):
    """``a @ b`` for (N, 4) x (4, 4), as a broadcast sum: a tiny BLAS call on 2 busy threads can take 100x longer."""
    return (a[:, :, None] * b[None]).sum(1)


class Dummy(nn.Module):
    num_classes = 0

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros((), dtype=torch.float64))


def _start():
    return torch.randn(N, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _exact(x_T):
    """The exact ODE solution at sigma = 0 from x(sigma_max) = sigma_max x_T."""
    f = GaussianFormulation()
    gain = (f.lam / (f.lam + f.sigma_max**2)).sqrt()
    z = _matmul(f.sigma_max * x_T.reshape(N, -1) - MU, f.q)
    return MU + _matmul(gain * z, f.q.T)


def _run(name, steps, **options):
    states = []
    sampler = samplers.SAMPLERS[name](steps=steps, clip_x0=False, guidance_scale=1.0, progress=False, **options)
    f = GaussianFormulation()
    sampler.sample(Dummy(), f, (N, *SHAPE), noise=_start(), generator=torch.Generator().manual_seed(1), callback=states.append)
    assert f.calls == sampler.nfe(False)
    return states[-1]["x"].reshape(N, -1)


def _moment_error(x, ref):
    """Largest error of the sample mean and covariance against those of ``ref``."""
    return max((x.mean(0) - ref.mean(0)).abs().max().item(), (torch.cov(x.T) - torch.cov(ref.T)).abs().max().item())


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpmpp_2m_sigma", 2)])
def test_moments_converge_at_the_solvers_order(name, order):
    """Doubling the steps divides the moment error by ~2^order (same start noise, so the error is the
    solver's, not sampling noise). Measured ratios for 16 -> 32 -> 64 steps: Euler 1.88, 1.94;
    Heun 4.73, 4.31; DPM-Solver++(2M) 4.86, 4.50 (below 16 steps the second-order ones are not yet
    in their asymptotic regime)."""
    exact = _exact(_start())
    errs = [_moment_error(_run(name, n), exact) for n in (16, 32, 64)]
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    lo, hi = (1.6, 2.4) if order == 1 else (3.4, 5.5)
    assert all(lo < r < hi for r in ratios), (errs, ratios)


def test_heun_beats_euler_at_equal_nfe():
    exact = _exact(_start())
    assert _moment_error(_run("heun", 32), exact) < 0.5 * _moment_error(_run("euler", 63), exact)


def test_samples_have_the_data_moments():
    """With enough steps the samples' moments are the data's, within sampling error (5 SE)."""
    x = _run("heun", 32).numpy()
    sigma = SIGMA.numpy()
    se_mean = np.sqrt(np.diag(sigma) / N)
    se_cov = np.sqrt((sigma**2 + np.outer(np.diag(sigma), np.diag(sigma))) / N)
    assert np.all(np.abs(x.mean(0) - MU.numpy()) < 5 * se_mean)
    assert np.all(np.abs(np.cov(x.T) - sigma) < 5 * se_cov)


@pytest.mark.parametrize("name,steps", [("euler_ancestral", 100), ("dpmpp_2m_sde", 40), ("heun", 48)])
def test_stochastic_samplers_reach_the_data_distribution(name, steps):
    """SDE solvers (and Heun with churn) are not ODE solutions of the start noise, but their samples
    still follow the data distribution: moments within sampling error plus a small discretisation bias."""
    options = {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0} if name == "heun" else {}  # gamma = 10 / steps
    x = _run(name, steps, **options).numpy()
    sigma = SIGMA.numpy()
    se_mean = np.sqrt(np.diag(sigma) / N)
    se_cov = np.sqrt((sigma**2 + np.outer(np.diag(sigma), np.diag(sigma))) / N)
    assert np.all(np.abs(x.mean(0) - MU.numpy()) < 5 * se_mean)
    assert np.all(np.abs(np.cov(x.T) - sigma) < 5 * se_cov + 0.03 * np.abs(sigma).max())
    # and the noise matters: the result differs from the deterministic ODE solution of the same start
    assert np.abs(x - _exact(_start()).numpy()).max() > 0.1
