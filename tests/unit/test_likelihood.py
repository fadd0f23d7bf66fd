"""Closed-form Gaussian terms against float64 references."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ddlab.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.1)), (0.3, math.log(0.01)), (-0.9, math.log(0.5)), (0.99, math.log(0.002))])
def test_discretized_bins_sum_to_one(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_discretized_interior_bin_matches_exact_cdf():
    """Interior bins integrate the Gaussian over [x - 1/255, x + 1/255] (the tanh CDF approximation is within 1 %)."""
    x = torch.tensor([0.2], dtype=torch.float64)
    m, s = torch.tensor([0.1], dtype=torch.float64), 0.05
    lp = discretized_gaussian_log_likelihood(x, m, torch.tensor([math.log(s)], dtype=torch.float64))
    n = Normal(0.1, s)
    ref = (n.cdf(torch.tensor(0.2 + 1 / 255)) - n.cdf(torch.tensor(0.2 - 1 / 255))).log()
    assert lp.item() == pytest.approx(ref.item(), abs=1e-2)


def test_prior_bpd_matches_closed_form():
    d = GaussianDiffusion(schedule="linear", num_timesteps=1000)
    x0 = torch.tensor([[[[0.5, -1.0]]]], dtype=torch.float64)
    ab = float(d.alphas_cumprod[-1])
    mean = np.sqrt(ab) * np.array([0.5, -1.0])
    var = 1 - ab
    kl = 0.5 * (-1 - np.log(var) + var + mean**2)
    assert d.prior_bpd(x0).item() == pytest.approx(kl.mean() / np.log(2), rel=1e-9)
