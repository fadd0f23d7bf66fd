"""EDM (Karras et al. 2022) against its specification: table 1's preconditioning and loss weight in
float64, the unit-variance properties they were derived from, the log-normal noise levels, and the
optimal denoiser of analytic Gaussian data minimising the loss."""

import math

import pytest
import torch

from ddlab.diffusion import EDM, guided_model_fn
from ddlab.models import UNet

SIGMAS = [0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 80.0]


def table1(sigma: float, sd: float) -> dict:
    """EDM table 1 ("Ours" column) and eq. 8's weight, written out with the math module."""
    return {
        "c_skip": sd**2 / (sigma**2 + sd**2),
        "c_out": sigma * sd / math.sqrt(sigma**2 + sd**2),
        "c_in": 1.0 / math.sqrt(sigma**2 + sd**2),
        "c_noise": math.log(sigma) / 4.0,
        "weight": (sigma**2 + sd**2) / (sigma * sd) ** 2,
    }


class Probe(torch.nn.Module):
    """A network that records its inputs and returns a fixed output ``F``."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.seen = {}

    def forward(self, x, t, y=None):
        self.seen = {"x": x.clone(), "t": t.clone(), "y": y}
        return self.out.to(x.dtype)


@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_coefficients_match_table1(sd):
    edm = EDM(sigma_data=sd)
    c = edm.coefficients(torch.tensor(SIGMAS, dtype=torch.float64))
    for i, s in enumerate(SIGMAS):
        ref = table1(s, sd)
        for k, v in ref.items():
            assert c[k][i].item() == pytest.approx(v, rel=1e-12, abs=1e-15), (k, s)
            assert c[k].dtype == torch.float64


def test_denoise_applies_the_preconditioning():
    """D = c_skip x + c_out F(c_in x, time_scale c_noise + time_offset), with labels passed through."""
    edm = EDM(sigma_data=0.7, time_scale=300.0, time_offset=400.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(SIGMAS), 2, 4, 4, generator=g, dtype=torch.float64)
    f = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y = torch.arange(len(SIGMAS))
    net = Probe(f)
    d = edm.denoise(net, x, torch.tensor(SIGMAS, dtype=torch.float64), y)
    for i, s in enumerate(SIGMAS):
        ref = table1(s, 0.7)
        torch.testing.assert_close(net.seen["x"][i], ref["c_in"] * x[i], rtol=1e-12, atol=1e-12)
        assert net.seen["t"][i].item() == pytest.approx(300.0 * ref["c_noise"] + 400.0, rel=1e-6)
        torch.testing.assert_close(d[i], ref["c_skip"] * x[i] + ref["c_out"] * f[i], rtol=1e-12, atol=1e-12)
    assert torch.equal(net.seen["y"], y)
    # a scalar sigma is broadcast to the batch
    torch.testing.assert_close(edm.denoise(net, x, 0.5), edm.denoise(net, x, torch.full((len(SIGMAS),), 0.5)))


def test_time_input_defaults_cover_the_ddpm_scale():
    edm = EDM()
    t = edm.time_input(torch.tensor([edm.sigma_min, 1.0, edm.sigma_max]))
    assert t[1].item() == pytest.approx(500.0)
    assert 0 < t[0].item() < t[1].item() < t[2].item() < 1000


def test_training_loss_is_the_weighted_denoising_error():
    edm = EDM()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    n = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    f = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sig = [0.05, 0.8, 20.0]
    terms = edm.training_losses(Probe(f), x0, torch.tensor(sig), noise=n)
    for i, s in enumerate(sig):
        ref = table1(s, 0.5)
        x = x0[i] + s * n[i]
        d = ref["c_skip"] * x + ref["c_out"] * f[i]
        mse = ((d - x0[i]) ** 2).mean().item()
        assert terms["mse"][i].item() == pytest.approx(mse, rel=1e-6)
        assert terms["loss"][i].item() == pytest.approx(ref["weight"] * mse, rel=1e-6)
        # lambda ||D - x0||^2 = ||F - F_target||^2: the network regresses its effective target with unit weight
        target = (x0[i] - ref["c_skip"] * x) / ref["c_out"]
        assert terms["loss"][i].item() == pytest.approx(((f[i] - target) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 50.0])
def test_network_input_and_target_have_unit_variance(sigma):
    """Karras et al. app. B.6: for data of std sigma_data, c_in x and the effective target
    (x0 - c_skip x) / c_out both have unit variance at every sigma."""
    sd = 0.5
    edm = EDM(sigma_data=sd)
    g = torch.Generator().manual_seed(2)
    x0 = sd * torch.randn(400_000, generator=g, dtype=torch.float64)
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    c = edm.coefficients(torch.tensor(sigma))
    assert (c["c_in"] * x).var().item() == pytest.approx(1.0, abs=0.01)
    assert ((x0 - c["c_skip"] * x) / c["c_out"]).var().item() == pytest.approx(1.0, abs=0.01)


def test_limits():
    edm = EDM()
    lo = edm.coefficients(torch.tensor([1e-8]))
    assert lo["c_skip"].item() == pytest.approx(1.0, abs=1e-12) and lo["c_out"].item() < 1e-7
    hi = edm.coefficients(torch.tensor([1e6]))
    assert hi["c_skip"].item() < 1e-12 and hi["c_out"].item() == pytest.approx(0.5, rel=1e-9)
    # at sigma = 0 the denoiser is the identity, whatever the network says
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(edm.denoise(Probe(torch.full_like(x, 1e3)), x, 0.0), x)


def test_log_normal_sigma_moments():
    edm = EDM(P_mean=-0.4, P_std=0.9)
    s = edm.sample_sigma(200_000, generator=torch.Generator().manual_seed(3)).double()
    log_s = s.log()
    assert log_s.mean().item() == pytest.approx(-0.4, abs=4 * 0.9 / math.sqrt(2e5))
    assert log_s.std().item() == pytest.approx(0.9, abs=0.01)
    # E[sigma] = exp(P_mean + P_std^2 / 2) for a log-normal
    assert s.mean().item() == pytest.approx(math.exp(-0.4 + 0.81 / 2), rel=0.02)
    # seeded: same generator state, same levels
    a = edm.sample_sigma(5, generator=torch.Generator().manual_seed(7))
    b = edm.sample_sigma(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (5,) and a.dtype == torch.float32


def test_noise_level_bins_are_the_training_quartiles():
    edm = EDM()
    s = edm.sample_sigma(40_000, generator=torch.Generator().manual_seed(4))
    counts = torch.bincount(edm.noise_level_bin(s, 4), minlength=4).double() / s.numel()
    torch.testing.assert_close(counts, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01, rtol=0)
    assert edm.noise_level_bin(torch.tensor([1e-6, 1e6])).tolist() == [0, 3]


class PosteriorMeanNet(torch.nn.Module):
    """The network F that makes D(x; sigma) the exact posterior mean E[x0 | x] of data
    x0 ~ N(mu, diag(v)): E[x0 | x] = mu + v / (v + sigma^2) (x - mu). It inverts the preconditioning
    (x = input / c_in, sigma from the time input) using table 1's formulas; ``delta`` perturbs D."""

    def __init__(self, mu, v, sd, time_scale, time_offset, delta=None):
        super().__init__()
        self.mu, self.v, self.sd, self.scale, self.offset, self.delta = mu, v, sd, time_scale, time_offset, delta

    def forward(self, inp, t, y=None):
        s = torch.exp(4.0 * (t.double() - self.offset) / self.scale).reshape(-1, 1, 1, 1)
        sd = self.sd
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1.0 / (s**2 + sd**2).sqrt()
        x = inp / c_in
        d = self.mu + self.v / (self.v + s**2) * (x - self.mu)
        if self.delta is not None:
            d = d + self.delta(x)
        return (d - c_skip * x) / c_out


@pytest.mark.parametrize("sigma", [0.05, 0.5, 4.0])
def test_optimal_denoiser_minimises_the_loss(sigma):
    """On Gaussian data the posterior mean minimises E[lambda ||D - x0||^2]; its loss is lambda times
    the posterior variance v sigma^2 / (v + sigma^2), and any perturbed D scores higher."""
    sd = 0.5
    edm = EDM(sigma_data=sd, time_scale=1.0, time_offset=0.0)  # the paper's c_noise, recovered exactly
    g = torch.Generator().manual_seed(5)
    n, shape = 4096, (1, 2, 2)
    mu = torch.tensor([0.3, -0.2, 0.0, 0.5], dtype=torch.float64).reshape(shape)
    v = torch.tensor([0.25, 0.04, 0.5, 0.1], dtype=torch.float64).reshape(shape)
    x0 = mu + v.sqrt() * torch.randn((n,) + shape, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sig = torch.full((n,), sigma, dtype=torch.float64)

    def loss(delta=None):
        net = PosteriorMeanNet(mu, v, sd, 1.0, 0.0, delta)
        return edm.training_losses(net, x0, sig, noise=noise)["loss"].mean().item()

    best = loss()
    post_var = (v * sigma**2 / (v + sigma**2)).mean().item()
    assert best == pytest.approx(table1(sigma, sd)["weight"] * post_var, rel=0.05)
    for delta in (lambda x: 0.05 * sigma * torch.ones_like(x), lambda x: -0.05 * sigma * torch.ones_like(x),
                  lambda x: 0.1 * (x - mu), lambda x: -0.1 * (x - mu)):
        assert loss(delta) > best


def test_guidance_is_linear_in_the_denoiser():
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=[1, 2], num_classes=3).eval()
    edm = EDM()
    x, y, s = torch.randn(2, 1, 8, 8), torch.tensor([0, 2]), torch.tensor([0.3, 5.0])
    with torch.no_grad():
        d_c, d_u = edm.denoise(net, x, s, y), edm.denoise(net, x, s, torch.full_like(y, 3))
        d_g = edm.denoise(guided_model_fn(net, 2.0), x, s, y)
    torch.testing.assert_close(d_g, d_u + 2.0 * (d_c - d_u), rtol=1e-4, atol=1e-5)


def test_bad_options_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="sigma_dat.*choose from sigma_data"):
        EDM(sigma_dat=0.5)
    with pytest.raises(ValueError, match="num_timesteps"):
        EDM(num_timesteps=50)
    with pytest.raises(ValueError, match="scheduler.sigma_data must be positive"):
        EDM(sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma_max"):
        EDM(sigma_min=1.0, sigma_max=0.5)
    edm, x = EDM(), torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        edm.denoise(Probe(x), x, torch.tensor([0.1, -1.0]))
    with pytest.raises(ValueError, match="shape"):
        edm.denoise(Probe(x), x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="no learned variance"):
        edm.denoise(Probe(torch.cat([x, x], 1)), x, 0.5)
    with pytest.raises(ValueError, match="> 0"):
        edm.training_losses(Probe(x), x, torch.tensor([0.0, 1.0]))


def test_bits_per_dim_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="bits/dim is not defined for scheduler=edm"):
        EDM().calc_bpd_loop(lambda x, t, y: x, torch.zeros(1, 1, 4, 4))
