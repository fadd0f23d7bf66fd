"""ddlab's DDPM and DDIM loops against diffusers' DDPMScheduler / DDIMScheduler, step by step.

Both sides get the same schedule (diffusers' alpha-bar is replaced by ddlab's, cast to float32, so the
comparison isolates the update rule; schedule parity itself is in test_schedules.py), the same model
output and the same noise. Clipping is off on both sides.
"""

import pytest
import torch
from torch import nn

from ddlab.diffusion import GaussianDiffusion, samplers

T = 1000
STEPS = 20  # divides T, so diffusers' DDIM previous-step rule (t - T // steps) is right for trailing too
SHAPE = (3, 2, 4, 4)
PRED_NAMES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def trajectory(sampler, net, d, shape, **kw):
    """Every step's state ``{"i", "t", "x", "denoised"}`` of one sampling run (x before clamping)."""
    states = []
    sampler.sample(net, d, shape, callback=states.append, **kw)
    return states


class ToyNet(nn.Module):
    """A fixed nonlinear "model" that keeps the sampler's states O(1): the posterior mean of x0 for
    N(0, 0.25 I) data plus a nonlinear perturbation, returned as eps, x0 or v."""

    num_classes = 0

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str = "eps", out_mult: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(SHAPE[1], SHAPE[1], generator=g) * 0.5)
        self.ab = alphas_cumprod  # float64, cast to the input dtype
        self.prediction, self.out_mult = prediction, out_mult

    def forward(self, x, t, y=None):
        ab = self.ab[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = 0.25 * ab.sqrt() * x / (0.25 * ab + 1 - ab) + 0.1 * torch.tanh(torch.einsum("oc,bchw->bohw", self.w.to(x.dtype), x))
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction]
        if self.out_mult == 2:  # learned_range: variance values in [-1, 1]
            out = torch.cat([out, torch.tanh(2 * x + t.to(x.dtype).view(-1, 1, 1, 1) / T)], dim=1)
        return out


def _diffusers(kind, prediction, spacing, d, variance="fixed_small"):
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddpm":
        s = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", prediction_type=PRED_NAMES[prediction],
                          variance_type=variance, clip_sample=False, timestep_spacing=spacing)
    else:
        s = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", prediction_type=PRED_NAMES[prediction],
                          clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    s.alphas_cumprod = d.alphas_cumprod.float()
    s.set_timesteps(STEPS)
    return s


def _lockstep(kind, prediction, spacing, eta=0.0, schedule="cosine", variance="fixed_small", ref_eta=None,
              skip_last=False, dtype=torch.float64, monkeypatch=None):
    """Run ddlab's sampler; feed every ddlab state x_t to diffusers' step with the same model output
    and noise, and compare diffusers' x_{t-1} with ddlab's. Returns the worst error relative to
    max(1, max |x|) over the steps (|x| stays O(1) with the toy model)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    ref_eta = eta if ref_eta is None else ref_eta
    d = GaussianDiffusion(schedule=schedule, num_timesteps=T, prediction=prediction, variance=variance)
    net = ToyNet(d.alphas_cumprod, prediction, 2 if variance == "learned_range" else 1)
    options = {"eta": eta} if kind == "ddim" else {}
    sampler = samplers.SAMPLERS[kind](steps=STEPS, spacing=spacing, clip_x0=False, guidance_scale=1.0, progress=False, **options)
    ref = _diffusers(kind, prediction, spacing, d, variance)
    if dtype == torch.float64:
        ref.alphas_cumprod = d.alphas_cumprod.clone()
    x_T = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(5), dtype=dtype)
    g = torch.Generator().manual_seed(11)
    g_ref = torch.Generator().manual_seed(11)  # replays ddlab's draws: z before each step i > 0
    z_box = {}
    monkeypatch.setattr(ddpm_mod, "randn_tensor", lambda shape, **kw: z_box["z"].to(kw.get("dtype") or torch.float32))
    x = x_T
    seen_t = []
    worst = 0.0
    for i, state in enumerate(trajectory(sampler, net, d, SHAPE, noise=x_T, generator=g)):
        t = state["t"]
        seen_t.append(t)
        assert t == int(ref.timesteps[i]), f"step {i}: ddlab t={t}, diffusers t={int(ref.timesteps[i])}"
        out = net(x, torch.full((SHAPE[0],), t), None)
        z = torch.randn(*SHAPE, generator=g_ref) if state["i"] > 0 else torch.zeros(SHAPE)
        z_box["z"] = z
        if kind == "ddpm":
            prev = ref.step(out, t, x).prev_sample
        else:
            prev = ref.step(out, t, x, eta=ref_eta, variance_noise=z.to(dtype)).prev_sample
        if skip_last and state["i"] == 0:
            break
        assert state["x"].dtype == dtype and prev.dtype == dtype
        err = (prev - state["x"]).abs().max().item()
        worst = max(worst, err / max(prev.abs().max().item(), 1.0))
        x = state["x"]  # lockstep: both continue from ddlab's state
    assert len(seen_t) == STEPS
    return worst


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPE_SCHEDULE = [(torch.float64, "cosine"), (torch.float32, "linear")]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("dtype,schedule", DTYPE_SCHEDULE)
def test_ddpm_matches_diffusers(prediction, spacing, dtype, schedule, monkeypatch):
    """fixed_small variance (beta~ of the respaced process) on both sides. float32 uses the linear
    schedule: at the cosine schedule's last step (alpha-bar 2e-9) x0 = x / sqrt(ab) - ... loses
    ~4 digits in float32 whatever the order of operations, so it is compared in float64."""
    assert _lockstep("ddpm", prediction, spacing, schedule=schedule, dtype=dtype, monkeypatch=monkeypatch) < TOL[dtype]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("dtype,schedule", DTYPE_SCHEDULE)
def test_ddim_matches_diffusers(prediction, spacing, eta, dtype, schedule, monkeypatch):
    assert _lockstep("ddim", prediction, spacing, eta=eta, schedule=schedule, dtype=dtype, monkeypatch=monkeypatch) < TOL[dtype]


def test_ddpm_learned_range_matches_diffusers_linspace(monkeypatch):
    """learned_range: log-variance interpolated between beta~_t and beta_t of the respaced process;
    linspace ends at t = 0, where neither side adds noise, so every step is compared."""
    assert _lockstep("ddpm", "eps", "linspace", variance="learned_range", monkeypatch=monkeypatch) < 1e-10


def test_ddpm_learned_range_trailing_and_last_step(monkeypatch):
    """Trailing spacing ends at t = 49 > 0: diffusers then interpolates towards log(1e-20) and adds
    noise at the last step; ddlab (like improved-diffusion) returns the noiseless mean there, which
    for alpha-bar_prev = 1 is exactly the predicted x0. All earlier steps match diffusers."""
    assert _lockstep("ddpm", "eps", "trailing", variance="learned_range", skip_last=True, monkeypatch=monkeypatch) < 1e-10
    d = GaussianDiffusion(schedule="linear", num_timesteps=T, variance="learned_range")
    net = ToyNet(d.alphas_cumprod, "eps", 2)
    sampler = samplers.ddpm(steps=STEPS, spacing="trailing", clip_x0=False, progress=False)
    *_, last = trajectory(sampler, net, d, SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(last["x"], last["denoised"])


def test_parity_harness_detects_a_wrong_eta(monkeypatch):
    """The harness can fail: ddlab at eta=1 against diffusers at eta=0 disagrees."""
    assert _lockstep("ddim", "eps", "trailing", eta=1.0, ref_eta=0.0, monkeypatch=monkeypatch) > 1e-1


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_matches_diffusers(prediction, steps):
    """DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, trailing,
    final sigma 0, no lower-order second-to-last step), whole trajectory from the same x_T in float64."""
    from diffusers import DPMSolverMultistepScheduler

    d = GaussianDiffusion(schedule="cosine", num_timesteps=T, prediction=prediction)
    net = ToyNet(d.alphas_cumprod, prediction)
    ref = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", algorithm_type="dpmsolver++",
                                      solver_order=2, prediction_type=PRED_NAMES[prediction], timestep_spacing="trailing",
                                      lower_order_final=False, final_sigmas_type="zero")
    ref.alphas_cumprod = d.alphas_cumprod.clone()
    ref.set_timesteps(steps)
    x_T = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(net(x, torch.full((SHAPE[0],), int(t))), t, x).prev_sample
    sampler = samplers.dpmpp_2m(steps=steps, spacing="trailing", clip_x0=False, progress=False)
    states = trajectory(sampler, net, d, SHAPE, noise=x_T)
    assert [s["t"] for s in states] == [int(t) for t in ref.timesteps]
    # diffusers keeps its sigmas in float32, so the agreement is to float32 precision
    torch.testing.assert_close(states[-1]["x"], x, rtol=0, atol=1e-5)


def test_dpmpp_2m_is_second_order_on_the_oracle():
    """With the exact posterior-mean predictor of N(0, 0.25 I) data (the probability-flow ODE is then linear
    and solvable), DPM-Solver++(2M)'s error falls faster with the step count than DDIM's (first order)."""
    d = GaussianDiffusion(schedule="cosine", num_timesteps=T, prediction="x0")

    class Oracle(nn.Module):
        num_classes = 0

        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, x, t, y=None):
            ab = d.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
            return 0.25 * ab.sqrt() * x / (0.25 * ab + 1 - ab)

    # exact ODE solution for Gaussian data: x_0 = sqrt(var0 / var_T) x_T with var_t = 0.25 ab_t + 1 - ab_t
    ab_T = d.alphas_cumprod[-1]
    x_T = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = x_T * (0.25 / (0.25 * ab_T + 1 - ab_T)).sqrt()
    errs = {}
    for kind in ("ddim", "dpmpp_2m"):
        for n in (10, 20):
            *_, last = trajectory(samplers.SAMPLERS[kind](steps=n, clip_x0=False, progress=False), Oracle(), d, SHAPE, noise=x_T)
            out = last["x"]  # unclamped (sample() clamps to [-1, 1])
            errs[kind, n] = (out - exact).abs().max().item()
    assert errs["dpmpp_2m", 10] < errs["ddim", 10] / 2.5
    assert errs["dpmpp_2m", 20] < errs["dpmpp_2m", 10] / 2.5  # ~4x for a second-order method
