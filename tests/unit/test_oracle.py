"""The oracle test: Gaussian data, the analytic optimal predictor as the "model".

For x0 ~ N(mu, Sigma) and x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, the marginal is
x_t ~ N(sqrt(ab) mu, ab Sigma + (1 - ab) I) and the optimal predictors are
E[x0 | x_t] = mu + sqrt(ab) Sigma (ab Sigma + (1 - ab) I)^-1 (x_t - sqrt(ab) mu),
E[eps | x_t] = (x_t - sqrt(ab) E[x0 | x_t]) / sqrt(1 - ab).
The true reverse kernel is Gaussian with variance beta_t v_{t-1} / v_t per eigen-direction, where
v_t = ab_t lambda + 1 - ab_t is the marginal variance (v_{-1} = lambda).

Checks: samples of DDPM (1000 steps) and DDIM (50 steps, eta 0) against (a) the exact output
moments of the discretised sampler, propagated in float64 by an independent numpy re-derivation,
and (b) the data moments; the VLB in bits/dim of the oracle with its exact reverse variance
(learned_range) against the exact NLL of the quantised Gaussian.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ddlab.diffusion import GaussianDiffusion, samplers

MU = torch.tensor([-0.3, 0.1, 0.25, 0.0], dtype=torch.float64)
_A = torch.tensor([[0.5, 0, 0, 0], [0.2, 0.4, 0, 0], [-0.1, 0.2, 0.3, 0], [0.0, 0.1, -0.2, 0.45]], dtype=torch.float64)
SIGMA = _A @ _A.T  # full covariance, eigenvalues 0.04 .. 0.34
SHAPE = (1, 2, 2)  # D = 4 dimensions as a (C, H, W) image


def cosine_alpha_bar_np(T):
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))


class Oracle(nn.Module):
    """Bayes-optimal predictor for N(mu, Sigma) data; optional exact reverse variance (learned_range)."""

    num_classes = 0

    def __init__(self, alphas_cumprod, mu, sigma, prediction="eps", learned_range=False):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # samplers read the device from the parameters
        self.ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.mu = mu
        self.lam, self.q = torch.linalg.eigh(sigma)
        self.prediction = prediction
        self.learned_range = learned_range
        if learned_range:  # reverse-variance bounds written out from the definitions, in float64
            if not torch.equal(sigma, torch.diag(torch.diagonal(sigma))):
                raise ValueError("the per-dimension reverse variance needs a diagonal Sigma")
            self.var_diag = torch.diagonal(sigma)
            ab = self.ab
            ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
            betas = 1 - ab / ab_prev
            post = betas * (1 - ab_prev) / (1 - ab)
            self.min_log = torch.log(torch.cat([post[1:2], post[1:]]))  # beta~_t, beta~_1 at t = 0
            self.max_log = torch.log(betas)
            self.betas = betas

    def forward(self, x, t, y=None):
        b = x.shape[0]
        xf = x.reshape(b, -1).double()
        ab = self.ab[t].view(-1, 1)
        z = (xf - ab.sqrt() * self.mu) @ self.q
        x0 = self.mu + (ab.sqrt() * self.lam / (ab * self.lam + 1 - ab) * z) @ self.q.T
        eps = (xf - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction]
        out = out.reshape(x.shape)
        if self.learned_range:
            lam = self.var_diag.view(1, -1)
            ab_prev = torch.where(t > 0, self.ab[(t - 1).clamp(min=0)], torch.ones_like(self.ab[t])).view(-1, 1)
            v_t = ab * lam + 1 - ab
            v_prev = ab_prev * lam + 1 - ab_prev
            true_var = self.betas[t].view(-1, 1) * v_prev / v_t
            frac = (true_var.log() - self.min_log[t].view(-1, 1)) / (self.max_log[t] - self.min_log[t]).view(-1, 1)
            out = torch.cat([out, (2 * frac - 1).reshape(x.shape)], dim=1)
        return out.to(x.dtype)


def propagate(kind, ab_kept, lam, m, eta=0.0):
    """Exact mean and variance, per eigen-direction, of the sampler's output for the oracle:
    every step is affine in x plus Gaussian noise. ab_kept: alpha-bar at the kept steps (ascending)."""
    mean, var = np.zeros_like(lam), np.ones_like(lam)  # x_T ~ N(0, I)
    for k in range(len(ab_kept) - 1, -1, -1):
        ab, ab_prev = ab_kept[k], (ab_kept[k - 1] if k > 0 else 1.0)
        # x0_hat = c0 + c1 x ; eps_hat = (x - sqrt(ab) x0_hat) / sqrt(1 - ab)
        c1 = np.sqrt(ab) * lam / (ab * lam + 1 - ab)
        c0 = m - c1 * np.sqrt(ab) * m
        if kind == "ddim":
            sig2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
            d = np.sqrt(1 - ab_prev - sig2) / np.sqrt(1 - ab)
            a1 = np.sqrt(ab_prev) * c1 + d * (1 - np.sqrt(ab) * c1)
            a0 = np.sqrt(ab_prev) * c0 - d * np.sqrt(ab) * c0
            noise = sig2 if k > 0 else 0.0
        else:  # posterior mean with x0_hat, posterior variance of the (respaced) process
            beta = 1 - ab / ab_prev
            k1, k2 = np.sqrt(ab_prev) * beta / (1 - ab), np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
            a1, a0 = k1 * c1 + k2, k1 * c0
            noise = beta * (1 - ab_prev) / (1 - ab) if k > 0 else 0.0
        mean, var = a0 + a1 * mean, a1**2 * var + noise
    return mean, var


@pytest.mark.parametrize(
    "kind,steps,n,prediction,data_rel_tol",
    [
        ("ddpm", None, 1000, "eps", 0.01),  # 1000 ancestral steps: ~unbiased
        ("ddim", 50, 4000, "v", 0.07),  # 50 deterministic steps: first-order solver, ~5 % low variance
    ],
)
def test_oracle_samples_match_gaussian(kind, steps, n, prediction, data_rel_tol):
    T = 1000
    d = GaussianDiffusion(schedule="cosine", num_timesteps=T, prediction=prediction)
    oracle = Oracle(d.alphas_cumprod, MU, SIGMA, prediction)
    sampler = samplers.SAMPLERS[kind](steps=steps, spacing="trailing", clip_x0=False, progress=False)
    x_T = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = []
    sampler.sample(oracle, d, (n, *SHAPE), noise=x_T, generator=torch.Generator().manual_seed(1), callback=states.append)
    x = states[-1]["x"].reshape(n, -1).numpy()  # unclamped

    # exact moments of this discretised sampler (independent re-derivation, float64)
    ab_full = cosine_alpha_bar_np(T)
    kept = np.arange(T) if steps is None else np.round(np.arange(T, 0, -T / steps)).astype(int)[::-1] - 1
    lam, q = np.linalg.eigh(SIGMA.numpy())
    m_e, v_e = propagate(kind, ab_full[kept], lam, q.T @ MU.numpy())
    mean_ref, cov_ref = q @ m_e, q @ np.diag(v_e) @ q.T

    mean, cov = x.mean(0), np.cov(x.T)
    se_mean = np.sqrt(np.diag(cov_ref) / n)
    se_cov = np.sqrt((cov_ref**2 + np.outer(np.diag(cov_ref), np.diag(cov_ref))) / n)
    assert np.all(np.abs(mean - mean_ref) < 5 * se_mean), (mean, mean_ref)
    assert np.all(np.abs(cov - cov_ref) < 5 * se_cov), (cov, cov_ref)
    # and the sampler's exact output distribution is the data distribution up to its discretisation
    sigma = SIGMA.numpy()
    np.testing.assert_allclose(mean_ref, MU.numpy(), atol=1e-3)
    assert np.abs(cov_ref - sigma).max() < data_rel_tol * np.abs(sigma).max()
    # and the samples are within statistical + discretisation tolerance of the data moments
    assert np.all(np.abs(mean - MU.numpy()) < 5 * se_mean)
    assert np.abs(cov - sigma).max() < data_rel_tol * np.abs(sigma).max() + 5 * se_cov.max()


def test_ddim_discretisation_error_shrinks_with_steps():
    """The propagated DDIM output variance converges to the data's as steps grow (first order)."""
    T = 1000
    ab_full = cosine_alpha_bar_np(T)
    lam = np.linalg.eigvalsh(SIGMA.numpy())
    errs = []
    for steps in (25, 50, 100, 200):
        kept = np.round(np.arange(T, 0, -T / steps)).astype(int)[::-1] - 1
        _, v = propagate("ddim", ab_full[kept], lam, np.zeros_like(lam))
        errs.append(np.abs(v / lam - 1).max())
    # first order: doubling the steps halves the error (measured 0.24, 0.13, 0.068, 0.035)
    assert errs[-1] < 0.05 and all(0.4 * a < b < 0.6 * a for a, b in zip(errs, errs[1:])), errs


def _quantise(x):
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def test_oracle_vlb_matches_exact_nll():
    """VLB (bits/dim) of the oracle with its exact reverse variance = exact NLL of the quantised
    Gaussian. The bound is tight up to (i) the information the first noisy step x_0 keeps about the
    position inside an 8-bit bin and (ii) the tanh CDF approximation: ~0.01-0.03 bits/dim here.
    Also a regression test: the decoder term used to fail for fixed variances ((B,1,1,1) scales)."""
    T = 250  # linear schedule rescaled to T: beta_0 = 4e-4, first-step noise 2.5 bins wide
    sig = torch.tensor([0.15, 0.2, 0.25, 0.3], dtype=torch.float64)
    mu = torch.tensor([-0.2, 0.1, 0.0, 0.15], dtype=torch.float64)
    n = 192
    g = torch.Generator().manual_seed(0)
    x0 = _quantise(mu + sig * torch.randn(n, 4, generator=g, dtype=torch.float64)).reshape(n, *SHAPE)

    # exact NLL of the bins under N(mu, sig^2), float64, exact normal CDF
    normal = torch.distributions.Normal(mu, sig)
    xf = x0.reshape(n, 4)
    p = normal.cdf(xf + 1 / 255) - normal.cdf(xf - 1 / 255)
    nll_bpd = (-p.log() / math.log(2)).mean(dim=1)

    results = {}
    for variance in ("learned_range", "fixed_large"):
        d = GaussianDiffusion(schedule="linear", num_timesteps=T, variance=variance)
        oracle = Oracle(d.alphas_cumprod, mu, torch.diag(sig**2), learned_range=variance == "learned_range")
        torch.manual_seed(2)
        out = d.calc_bpd_loop(oracle, x0)
        results[variance] = out
        if variance == "learned_range":  # the exact variance lies inside [beta~_t, beta_t]: v in [-1, 1]
            vv = oracle(torch.zeros(T, *SHAPE, dtype=torch.float64), torch.arange(T))[:, 1:]
            assert vv.abs().max() <= 1 + 1e-9
    vlb = results["learned_range"]["total_bpd"]
    gap = (vlb - nll_bpd).mean().item()
    se = (vlb - nll_bpd).std().item() / math.sqrt(n)
    # measured: gap 0.10 +- 0.06 (SE) bits/dim on an NLL of 6.86 bits/dim; the per-term single-sample
    # KL estimates carry the noise, their expectation is the bound
    assert abs(gap) < 3 * se + 0.03, (gap, se, nll_bpd.mean().item())
    # terms add up and are what they claim to be
    out = results["learned_range"]
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb_sum"] + out["decoder_bpd"])
    assert out["prior_bpd"].max() < 1e-3  # q(x_T | x0) is almost N(0, I) at T
    # a wrong reverse variance loosens the bound visibly (same noise draws: a paired comparison;
    # measured +0.14 bits/dim for fixed_large, +1.1 for fixed_small)
    assert (results["fixed_large"]["total_bpd"] - vlb).mean().item() > 0.07


