"""Sigma space: the Karras schedule against EDM eq. 5 in float64, the VP-to-sigma wrapper against the
closed-form posterior mean, and Euler / Heun step for step against diffusers' EulerDiscreteScheduler /
HeunDiscreteScheduler with Karras sigmas on the same network."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ddlab.diffusion import GaussianDiffusion, VPDenoiser, karras_sigmas, samplers

T = 1000
SHAPE = (3, 2, 4, 4)
PRED_NAMES = {"eps": "epsilon", "v": "v_prediction"}


def test_karras_schedule_is_edm_eq5():
    n, lo, hi, rho = 7, 0.002, 80.0, 7.0
    got = karras_sigmas(n, lo, hi, rho)
    ref = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)] + [0.0]
    assert got.dtype == torch.float64 and len(got) == n + 1
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-14, atol=0)
    assert got[0].item() == pytest.approx(hi, rel=1e-14) and got[-2].item() == pytest.approx(lo, rel=1e-14)
    torch.testing.assert_close(karras_sigmas(1, lo, hi), torch.tensor([hi, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(5, 1.0, 0.5)


class GaussianVPNet(nn.Module):
    """Bayes-optimal network for N(mu, lam) data (per pixel) under the VP process with ``ab`` at the
    integer timestep ``round(t)``; returns eps, x0 or v, optionally with C extra variance channels."""

    num_classes = 0

    def __init__(self, ab, prediction, learned=False, mu=0.2, lam=0.3):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.ab, self.prediction, self.learned, self.mu, self.lam = ab, prediction, learned, mu, lam

    def forward(self, x, t, y=None):
        ab = self.ab[t.round().long()].view(-1, 1, 1, 1)
        x0 = self.mu + ab.sqrt() * self.lam / (ab * self.lam + 1 - ab) * (x - ab.sqrt() * self.mu)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction]
        return torch.cat([out, torch.full_like(out, 7.0)], dim=1) if self.learned else out


@pytest.mark.parametrize("prediction,learned", [("eps", False), ("x0", False), ("v", False), ("eps", True)])
def test_vp_denoiser_is_the_sigma_space_posterior_mean(prediction, learned):
    """At a training sigma the wrapped VP network must give E[x0 | x0 + sigma n] = mu + lam / (lam + sigma^2) (x - mu)."""
    d = GaussianDiffusion(schedule="cosine", num_timesteps=T, prediction=prediction)
    den = VPDenoiser(d)
    net = GaussianVPNet(d.alphas_cumprod, prediction, learned)
    idx = torch.tensor([0, 10, 500, 998])
    sigma = ((1 - d.alphas_cumprod[idx]) / d.alphas_cumprod[idx]).sqrt()
    torch.testing.assert_close(den.sigma_to_t(sigma), idx.double(), atol=1e-9, rtol=0)
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * (1 + sigma.view(-1, 1, 1, 1))
    expected = 0.2 + 0.3 / (0.3 + sigma.view(-1, 1, 1, 1) ** 2) * (x - 0.2)
    torch.testing.assert_close(den.denoise(net, x, sigma), expected, rtol=1e-9, atol=1e-9)


def test_vp_sigma_to_t_interpolates_log_sigma():
    d = GaussianDiffusion(schedule="linear", num_timesteps=T)
    den = VPDenoiser(d)
    s = den.sigmas
    mid = (s[41].log() * 0.25 + s[42].log() * 0.75).exp()  # a quarter of the way from 42 to 41 in log-sigma
    assert den.sigma_to_t(mid.view(1)).item() == pytest.approx(41.75, abs=1e-9)
    assert den.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, T - 1.0]  # clamped to the trained range
    assert (den.sigma_min, den.sigma_max) == (s[0].item(), s[-1].item())


class SmoothNet(nn.Module):
    """A fixed nonlinear network of (x, continuous t) that keeps states O(1) over the whole sigma range."""

    num_classes = 0

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(SHAPE[1], SHAPE[1], generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x, t, y=None):
        s = (t.to(x.dtype) / T).view(-1, 1, 1, 1)
        return 0.6 * x + 0.3 * torch.tanh(torch.einsum("oc,bchw->bohw", self.w.to(x.dtype), x)) * (1 + s)


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_matches_diffusers_with_karras_sigmas(name, prediction):
    """Whole trajectories from the same x_T agree step for step (diffusers keeps its sigmas and
    timesteps in float32, so the agreement is to float32 precision)."""
    d = GaussianDiffusion(schedule="linear", num_timesteps=T, prediction=prediction)
    net = SmoothNet()
    steps = 8
    x_T = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = _diffusers_reference(name, prediction, d, net, x_T, steps)
    sampler = samplers.SAMPLERS[name](steps=steps, clip_x0=False, guidance_scale=1.0, progress=False)
    states = []
    sampler.sample(net, d, SHAPE, noise=x_T, callback=states.append)
    assert len(states) == steps == len(ref["states"])
    np.testing.assert_allclose([s["sigma"] for s in states], ref["sigmas"], rtol=1e-6)
    for i, (ours, theirs) in enumerate(zip(states, ref["states"])):
        err = (ours["x"] - theirs).abs().max().item() / max(1.0, theirs.abs().max().item())
        assert err < 5e-6, f"step {i}: relative error {err:.2e}"  # measured <= 1e-7
    assert sampler.nfe(False) == (steps if name == "euler" else 2 * steps - 1) == ref["nfe"]


def _diffusers_reference(name, prediction, d, net, x_T, steps):
    """diffusers' loop as a user runs it: scale the input, call the network at the scheduler's
    (continuous) timestep, step. Returns the state after every full step, the sigmas and the NFE."""
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    cls = EulerDiscreteScheduler if name == "euler" else HeunDiscreteScheduler
    ref = cls(num_train_timesteps=T, beta_schedule="linear", prediction_type=PRED_NAMES[prediction],
              use_karras_sigmas=True, timestep_spacing="linspace")
    ref.alphas_cumprod = d.alphas_cumprod.clone()  # the same training sigmas on both sides
    ref.set_timesteps(steps)
    x = x_T * ref.init_noise_sigma
    states, nfe = [], 0
    for i, t in enumerate(ref.timesteps):
        out = net(ref.scale_model_input(x, t), t.expand(x.shape[0]))
        nfe += 1
        x = ref.step(out, t, x).prev_sample
        # Heun: a step is done when the scheduler is back in first order, or after the last (Euler) step
        if name == "euler" or ref.state_in_first_order or i == len(ref.timesteps) - 1:
            states.append(x)
    sigmas = ref.sigmas[:-1] if name == "euler" else torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2]])
    return {"states": states, "sigmas": sigmas.double().numpy(), "nfe": nfe}


def test_parity_harness_detects_a_wrong_solver():
    """The reference can fail: Euler's trajectory is not Heun's."""
    d = GaussianDiffusion(schedule="linear", num_timesteps=T)
    net = SmoothNet()
    x_T = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = _diffusers_reference("heun", "eps", d, net, x_T, 8)
    states = []
    samplers.euler(steps=8, clip_x0=False, progress=False).sample(net, d, SHAPE, noise=x_T, callback=states.append)
    assert (states[-1]["x"] - ref["states"][-1]).abs().max().item() > 1e-3


def test_karras_defaults_to_the_models_sigma_range():
    d = GaussianDiffusion(schedule="cosine", num_timesteps=T)
    sampler = samplers.heun(steps=5, progress=False)
    sig = sampler.sigmas(VPDenoiser(d))
    ab = d.alphas_cumprod
    assert sig[0].item() == pytest.approx(math.sqrt((1 - ab[-1]) / ab[-1]), rel=1e-12)
    assert sig[-2].item() == pytest.approx(math.sqrt((1 - ab[0]) / ab[0]), rel=1e-12) and sig[-1] == 0
    own = samplers.euler(steps=4, schedule="model", spacing="trailing", progress=False).sigmas(VPDenoiser(d))
    kept = [999, 749, 499, 249]
    torch.testing.assert_close(own, torch.cat([((1 - ab[kept]) / ab[kept]).sqrt(), torch.zeros(1, dtype=torch.float64)]))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_2m_sigma_on_the_model_sigmas_is_the_discrete_solver(prediction):
    """DPM-Solver++(2M) in sigma space over the model's own (trailing) sigmas, through the VP wrapper,
    equals the discrete DPM-Solver++(2M), which matches diffusers (test_diffusion_parity.py). The start
    differs by the factor sigma_max / sqrt(1 + sigma_max^2) = 1 - 2e-5 (cosine, T = 1000)."""
    d = GaussianDiffusion(schedule="cosine", num_timesteps=T, prediction=prediction)

    class RoundedNet(SmoothNet):  # the discrete solver calls it at integers, the wrapper at t +- 1e-12
        def forward(self, x, t, y=None):
            return super().forward(x, t.to(torch.float64).round(), y)

    net = RoundedNet()
    x_T = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {}
    for name, kw in (("dpmpp_2m", {}), ("dpmpp_2m_sigma", {"schedule": "model"})):
        states = []
        samplers.SAMPLERS[name](steps=10, spacing="trailing", clip_x0=False, progress=False, **kw).sample(
            net, d, SHAPE, noise=x_T, callback=states.append)
        out[name] = states[-1]["x"]
    # measured 1e-9 (a Karras schedule instead differs by 0.4)
    assert (out["dpmpp_2m"] - out["dpmpp_2m_sigma"]).abs().max().item() < 1e-6 * max(1.0, out["dpmpp_2m"].abs().max().item())
