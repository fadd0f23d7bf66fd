"""Loss-aware timestep sampler, respacing, classifier-free guidance, DDIM eta=1 vs DDPM."""

import numpy as np
import pytest
import torch
from torch import nn

from ddlab.diffusion import GaussianDiffusion, LossAwareSampler, guided_model_fn, samplers, space_timesteps


# ---------------------------------------------------------------- loss-aware sampler
def _synthetic_loss(t, g):
    """Loss at t with second moment E[L^2] = m(t)^2 + s(t)^2, m(t) = 1 + t, s(t) = 0.5 (1 + t)."""
    m = 1.0 + t.double()
    return m + 0.5 * m * torch.randn(t.shape, generator=g, dtype=torch.float64)


def test_loss_aware_converges_to_second_moment_weights():
    T = 8
    s = LossAwareSampler(T, history=400, uniform_prob=0.001)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(s.weights(), torch.full((T,), 1 / T, dtype=torch.float64))  # uniform until warm
    for _ in range(200):
        t, _ = s.sample(64, generator=g)
        s.update(t, _synthetic_loss(t, g))
    assert s.warmed_up()
    m = 1.0 + np.arange(T)
    target = np.sqrt(m**2 * 1.25)
    target = target / target.sum() * (1 - 0.001) + 0.001 / T
    np.testing.assert_allclose(s.weights().numpy(), target, rtol=0.08)


def test_importance_weighted_loss_is_unbiased():
    """E_{t~p}[w_t L_t] = (1/T) sum_t E[L_t] with w_t = 1 / (T p_t), for a non-uniform p."""
    T = 6
    s = LossAwareSampler(T, history=2)
    s.loss_history = torch.tensor([[1.0, 1.0], [2, 2], [5, 5], [0.5, 0.5], [3, 3], [8, 8]], dtype=torch.float64)
    s.loss_counts = torch.full((T,), 2)
    p = s.weights()
    mean_loss = torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=torch.float64)
    exact = (p * mean_loss / (T * p)).sum()  # closed form of the expectation
    assert exact.item() == pytest.approx(mean_loss.mean().item(), rel=1e-12)
    g = torch.Generator().manual_seed(1)
    t, w = s.sample(200_000, generator=g)
    est = (w.double() * mean_loss[t]).mean().item()
    se = (w.double() * mean_loss[t]).std().item() / np.sqrt(len(t))
    assert abs(est - mean_loss.mean().item()) < 5 * se
    assert not torch.allclose(p, torch.full_like(p, 1 / T))  # the test uses a non-uniform p


def test_loss_aware_state_dict_round_trip_and_shape_error():
    s = LossAwareSampler(5, history=3)
    s.update(torch.tensor([0, 1, 1, 4]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    s2 = LossAwareSampler(5, history=3)
    s2.load_state_dict(s.state_dict())
    assert torch.equal(s2.loss_history, s.loss_history) and torch.equal(s2.loss_counts, s.loss_counts)
    assert s2.loss_counts.tolist() == [1, 2, 0, 0, 1] and s2.loss_history[1, :2].tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="num_timesteps"):
        LossAwareSampler(6, history=3).load_state_dict(s.state_dict())


def test_loss_aware_all_gather_records_every_rank():
    """A fake all_gather for 2 ranks stacks (world, B): both ranks' losses enter the history."""
    other_t, other_l = torch.tensor([2, 3]), torch.tensor([7.0, 9.0])

    def fake_all_gather(x):
        return torch.stack([x, other_t if x.dtype == torch.long else other_l])

    s = LossAwareSampler(4, history=2)
    s.update(torch.tensor([0, 2]), torch.tensor([1.0, 5.0]), all_gather=fake_all_gather)
    assert s.loss_counts.tolist() == [1, 0, 2, 1]
    assert s.loss_history[2].tolist() == [5.0, 7.0] and s.loss_history[3, 0].item() == 9.0


def test_history_keeps_the_latest_losses():
    s = LossAwareSampler(1, history=3)
    for v in [1.0, 2.0, 3.0, 4.0, 5.0]:
        s.update(torch.tensor([0]), torch.tensor([v]))
    assert s.loss_history[0].tolist() == [3.0, 4.0, 5.0]


# ---------------------------------------------------------------- respacing
def test_spacings_by_hand():
    assert space_timesteps(10, 5, "leading") == [0, 2, 4, 6, 8]
    assert space_timesteps(10, 5, "trailing") == [1, 3, 5, 7, 9]
    assert space_timesteps(10, 4, "linspace") == [0, 3, 6, 9]  # round(0, 3, 6, 9)
    assert space_timesteps(10, step_size=3) == [0, 3, 6, 9]
    assert space_timesteps(10, step_size=4) == [1, 5, 9]
    assert space_timesteps(10, None) == list(range(10))
    with pytest.raises(ValueError, match="sampler.spacing"):
        space_timesteps(10, 5, "lead")
    with pytest.raises(ValueError, match="sampler.steps"):
        space_timesteps(10, 11)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_respaced_alpha_bar_equals_original_at_kept_steps(spacing):
    d = GaussianDiffusion(schedule="cosine", num_timesteps=1000)
    kept = space_timesteps(1000, 37, spacing)
    r = d.respace(kept)
    ab_ref = np.cumprod(1 - d.betas.numpy())[kept]
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), ab_ref, rtol=1e-9)  # float64 product of ratios
    assert r.num_timesteps == 37 and r.timestep_map.tolist() == kept
    # betas of the new process are 1 - ab[t_i] / ab[t_{i-1}]
    b_ref = 1 - ab_ref / np.concatenate([[1.0], ab_ref[:-1]])
    np.testing.assert_allclose(r.betas.numpy(), b_ref, rtol=1e-9)
    # the model is called with training indices
    assert r.scale_timesteps(torch.tensor([0, 36])).tolist() == [kept[0], kept[-1]]


# ---------------------------------------------------------------- guidance
class CountingNet(nn.Module):
    """out = x * (1 + t / 100) + class offset (the null class num_classes has offset 0.5)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.p = nn.Parameter(torch.zeros(()))
        self.calls, self.batch_sizes = 0, []

    def forward(self, x, t, y=None):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        off = torch.tensor([-1.0, 0.0, 2.0, 0.5])[y if y is not None else torch.full_like(t, self.num_classes)]
        return x * (1 + t.float() / 100).view(-1, 1, 1, 1) + off.view(-1, 1, 1, 1)


def test_guidance_combines_by_hand_in_one_forward():
    net = CountingNet()
    x = torch.ones(2, 1, 2, 2)
    t = torch.tensor([10, 50])
    y = torch.tensor([0, 2])
    out = guided_model_fn(net, guidance_scale=3.0)(x, t, y)
    assert net.calls == 1 and net.batch_sizes == [4]
    # eps_u = 1 * (1 + t/100) + 0.5; eps_c = ... + off[y]; w = 3
    base = torch.tensor([1.1, 1.5]).view(-1, 1, 1, 1)
    expected = (base + 0.5) + 3.0 * (torch.tensor([-1.0, 2.0]).view(-1, 1, 1, 1) - 0.5)
    torch.testing.assert_close(out, expected.expand(2, 1, 2, 2))
    # w = 1 is the plain conditional pass; w = 0 the unconditional one
    torch.testing.assert_close(guided_model_fn(net, 1.0)(x, t, y), net(x, t, y))
    torch.testing.assert_close(guided_model_fn(net, 0.0)(x, t, y), net(x, t, None))


def test_split_guidance_matches_joint_in_two_forwards():
    x = torch.randn(3, 1, 2, 2)
    t = torch.tensor([10, 50, 90])
    y = torch.tensor([0, 2, 1])
    joint_net, split_net = CountingNet(), CountingNet()
    joint = guided_model_fn(joint_net, 2.5, batching="joint")(x, t, y)
    split = guided_model_fn(split_net, 2.5, batching="split")(x, t, y)
    assert joint_net.batch_sizes == [6] and split_net.batch_sizes == [3, 3]
    torch.testing.assert_close(split, joint)
    # a whole sampling run gives the same images either way, on a real U-Net
    from ddlab.models import UNet

    torch.manual_seed(0)
    unet = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_classes=3).eval()
    d = GaussianDiffusion(num_timesteps=20)
    images = {}
    for batching in ("joint", "split"):
        s = samplers.dpmpp_2m(steps=4, guidance_scale=2.0, guidance_batching=batching, progress=False)
        images[batching] = s.sample(unet, d, (3, 1, 8, 8), y=y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images["split"], images["joint"], atol=1e-5, rtol=1e-5)


def test_guidance_batching_auto_and_bad_names():
    from ddlab.diffusion import resolve_guidance_batching

    assert resolve_guidance_batching("auto", "cpu") == "split"
    assert resolve_guidance_batching("auto", "cuda") == "joint"
    assert resolve_guidance_batching("joint", "cpu") == "joint"
    with pytest.raises(ValueError, match="sampler.guidance_batching"):
        samplers.ddim(guidance_batching="both")


def test_guidance_on_unconditional_model_is_an_error():
    net = CountingNet(num_classes=0)
    with pytest.raises(ValueError, match="without labels"):
        samplers.ddim(steps=2, progress=False).sample(net, GaussianDiffusion(num_timesteps=10), (1, 1, 2, 2), guidance_scale=3.0)


# ---------------------------------------------------------------- eta = 1 and DDPM
def test_ddim_eta_one_is_the_ddpm_step():
    """DDIM with eta=1 has sigma^2 = beta~_t and the posterior mean: the DDPM fixed_small step
    (gmongaras's DDIM_scale=1), here checked on a respaced process with the same noise."""
    d = GaussianDiffusion(schedule="linear", num_timesteps=100, prediction="eps").respace(space_timesteps(100, 10))
    net = CountingNet()
    kw = dict(steps=None, clip_x0=False, progress=False)
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = samplers.ddim(eta=1.0, **kw).sample(net, d, (2, 1, 2, 2), noise=noise, generator=torch.Generator().manual_seed(1), guidance_scale=1.0)
    b = samplers.ddpm(**kw).sample(net, d, (2, 1, 2, 2), noise=noise, generator=torch.Generator().manual_seed(1), guidance_scale=1.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = samplers.ddim(eta=0.0, **kw).sample(net, d, (2, 1, 2, 2), noise=noise, generator=torch.Generator().manual_seed(1), guidance_scale=1.0)
    assert (a - c).abs().max() > 1e-2


def test_device_cache_does_not_grow():
    d = GaussianDiffusion(num_timesteps=50, variance="learned_range", loss="hybrid", min_snr_gamma=5.0)
    x = torch.zeros(2, 1, 2, 2)

    def model(x, t, y):
        return torch.zeros(x.shape[0], 2, 2, 2)

    d.training_losses(model, x, torch.tensor([0, 10]))
    n = len(d._device_cache)
    for _ in range(5):
        d.training_losses(model, x, torch.tensor([3, 49]))
    assert len(d._device_cache) == n
