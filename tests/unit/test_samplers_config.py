"""Sampler configs map one to one to builders; legacy checkpoints' `Sampler(kind=...)` maps onto them;
NFE counts, progress bars and the dispatch between discrete and sigma-space formulations."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from ddlab.diffusion import GaussianDiffusion, Sampler, samplers
from ddlab.diffusion.samplers import SAMPLERS, sampler_config
from tests.conftest import CONFIG_DIR

# ddlab's own samplers (sampler=diffusers wraps diffusers' schedulers: tests/unit/test_interop_schedulers.py)
YAMLS = sorted(p for p in (CONFIG_DIR / "sampler").glob("*.yaml") if p.stem != "diffusers")


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_keys_are_exactly_the_builders_arguments(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    sampler = instantiate(cfg)
    assert sampler.name == path.stem and cfg["_target_"] == f"ddlab.diffusion.samplers.{path.stem}"
    assert set(cfg) - {"_target_"} == set(sampler.config)  # no unused key, none missing


def test_every_builder_has_a_yaml():
    assert {p.stem for p in YAMLS} == set(SAMPLERS)


@pytest.mark.parametrize("name,key", [("dpmpp_2m", "eta"), ("ddpm", "eta"), ("euler", "step_size"), ("ddim", "s_churn")])
def test_unknown_keys_are_rejected_with_the_valid_list(name, key):
    with pytest.raises(ValueError, match=rf"sampler.{key}: not an option of sampler '{name}'; valid options: .*steps"):
        SAMPLERS[name](**{key: 0.0})


def test_bad_values_name_the_key():
    for kwargs, key in [({"eta": 1.5}, "eta"), ({"spacing": "lead"}, "spacing"), ({"steps": 0}, "steps")]:
        with pytest.raises(ValueError, match=f"sampler.{key}"):
            samplers.ddim(**kwargs)
    with pytest.raises(ValueError, match="sampler.schedule"):
        samplers.heun(schedule="cosine")


def test_legacy_sampler_maps_onto_the_builders():
    old = {"_target_": "ddlab.diffusion.Sampler", "kind": "ddpm", "steps": None, "eta": 1.0, "spacing": "trailing",
           "step_size": None, "clip_x0": True, "guidance_scale": 2.0, "progress": True}
    s = instantiate(old)
    assert type(s) is type(samplers.ddpm()) and s.name == "ddpm" and "eta" not in s.config
    assert s.config == samplers.ddpm(steps=None, guidance_scale=2.0).config
    d = Sampler(kind="ddim", eta=0.5, steps=7)
    assert d.name == "ddim" and d.options == {"eta": 0.5} and d.steps == 7
    with pytest.raises(ValueError, match="sampler.kind: unknown sampler 'euler'"):
        Sampler(kind="euler")
    # a stored legacy config in builder form, and a switch to another sampler keeping the shared keys
    assert sampler_config(old) == {"_target_": "ddlab.diffusion.samplers.ddpm", **{k: v for k, v in old.items()
                                                                                 if k not in ("_target_", "kind", "eta")}}
    to_heun = sampler_config(old, "heun")
    assert to_heun == {"_target_": "ddlab.diffusion.samplers.heun", "steps": None, "spacing": "trailing", "clip_x0": True,
                       "guidance_scale": 2.0, "progress": True}


def test_nfe_counts_every_forward_and_guidance():
    assert samplers.ddim(steps=50).nfe(False) == 50 and samplers.ddim(steps=50).nfe(True) == 100
    assert samplers.heun(steps=18).nfe(False) == 35 and samplers.heun(steps=18).nfe(True) == 70
    assert samplers.dpmpp_2m_sde(steps=12).nfe(True) == 24
    d = GaussianDiffusion(num_timesteps=40)
    assert samplers.ddpm(steps=None).nfe(False, d) == 40 and samplers.ddpm(step_size=10, steps=None).nfe(False, d) == 4
    with pytest.raises(ValueError, match="nfe"):
        samplers.ddpm(steps=None).nfe(False)


class CountingNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.p = nn.Parameter(torch.zeros(()))
        self.rows = 0

    def forward(self, x, t, y=None):
        self.rows += x.shape[0]
        return 0.5 * x


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "heun", "euler_ancestral"])
@pytest.mark.parametrize("batching", ["joint", "split"])
def test_nfe_matches_the_forwards_made(name, batching):
    net = CountingNet()
    s = SAMPLERS[name](steps=4, guidance_batching=batching, progress=False)
    s.sample(net, GaussianDiffusion(num_timesteps=20), (2, 1, 2, 2), y=torch.tensor([0, 1]), guidance_scale=2.0)
    assert net.rows == 2 * s.nfe(guided=True)


def test_progress_false_prints_nothing(capsys):
    for name in ("ddim", "heun"):
        SAMPLERS[name](steps=3, progress=False).sample(CountingNet(0), GaussianDiffusion(num_timesteps=10), (1, 1, 2, 2))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    SAMPLERS["heun"](steps=3, progress=True).sample(CountingNet(0), GaussianDiffusion(num_timesteps=10), (1, 1, 2, 2))
    assert "heun" in capsys.readouterr().err  # the bar is the sampler's own


def test_replace_keeps_every_other_setting():
    s = samplers.dpmpp_2m(steps=20, guidance_scale=1.25, guidance_batching="joint")
    r = s.replace(steps=5, progress=False)
    assert (r.name, r.steps, r.guidance_scale, r.guidance_batching, r.progress) == ("dpmpp_2m", 5, 1.25, "joint", False)
    s.guidance_scale = 3.0  # callers may set the public attributes
    assert s.replace().guidance_scale == 3.0


class SigmaOnly:
    """A formulation in sigma space only (the EDM dispatch contract): no alphas_cumprod."""

    sigma_min, sigma_max = 0.002, 80.0

    def denoise(self, model, x, sigma, y=None):
        return model(x, sigma.log() / 4, y)


def test_discrete_samplers_refuse_a_sigma_only_formulation():
    for name in ("ddpm", "ddim", "dpmpp_2m"):
        with pytest.raises(ValueError, match="sampler=euler, sampler=heun"):
            SAMPLERS[name](steps=3, progress=False).sample(CountingNet(0), SigmaOnly(), (1, 1, 2, 2))
    with pytest.raises(ValueError, match="schedule=karras"):
        samplers.euler(steps=3, schedule="model", progress=False).sample(CountingNet(0), SigmaOnly(), (1, 1, 2, 2))


def test_sigma_samplers_run_a_sigma_only_formulation_with_guidance():
    net = CountingNet()
    s = samplers.heun(steps=3, guidance_batching="split", progress=False)
    x = s.sample(net, SigmaOnly(), (2, 1, 2, 2), y=torch.tensor([1, 2]), guidance_scale=1.5,
                 generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 2, 2) and x.abs().max() <= 1 and net.rows == 2 * s.nfe(True)


class RecordingNet(CountingNet):
    """Records, per forward, its time input and whether it was the unconditional (null-label) pass."""

    def __init__(self, num_classes=3):
        super().__init__(num_classes)
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((float(t[0]), y is not None and bool((y == self.num_classes).all())))
        return super().forward(x, t, y)


def _guided_times(net):
    return [t for t, uncond in net.calls if uncond]


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m_sigma"])
def test_guidance_interval_guides_exactly_the_sigmas_inside_it_sigma_space(name):
    lo, hi = 0.5, 20.0
    net = RecordingNet()
    kw = {"s_churn": 2.0} if name == "heun" else {}
    s = SAMPLERS[name](steps=6, guidance_interval=[lo, hi], guidance_batching="split", progress=False, **kw)
    s.sample(net, SigmaOnly(), (2, 1, 2, 2), y=torch.tensor([0, 1]), guidance_scale=2.0,
             generator=torch.Generator().manual_seed(0))
    guided = [torch.tensor(4 * t).exp().item() for t in _guided_times(net)]  # SigmaOnly feeds t = log(sigma) / 4
    evals = s.eval_sigmas(SigmaOnly())
    assert guided == pytest.approx([v for v in evals if lo < v <= hi], rel=1e-5)
    assert 0 < len(guided) < len(evals)  # the interval cuts the schedule on both sides
    assert net.rows == 2 * s.nfe(True, SigmaOnly())


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_guidance_interval_guides_exactly_the_sigmas_inside_it_discrete(name):
    d = GaussianDiffusion(num_timesteps=100)
    ab = d.alphas_cumprod.double()
    sigma_of_t = ((1 - ab) / ab).sqrt()
    lo, hi = 0.3, 3.0
    net = RecordingNet()
    s = SAMPLERS[name](steps=10, guidance_interval=[lo, hi], guidance_batching="split", progress=False)
    s.sample(net, d, (2, 1, 2, 2), y=torch.tensor([0, 1]), guidance_scale=2.0)
    guided = [float(sigma_of_t[round(t)]) for t in _guided_times(net)]
    all_sigmas = [float(sigma_of_t[round(t)]) for t, uncond in net.calls if not uncond]  # one conditional pass per step
    assert guided == [v for v in all_sigmas if lo < v <= hi] and 0 < len(guided) < len(all_sigmas)
    assert net.rows == 2 * s.nfe(True, d)


def test_guidance_interval_covering_everything_is_plain_guidance_and_an_empty_one_is_none():
    d = GaussianDiffusion(num_timesteps=50)
    y, noise = torch.tensor([0, 1]), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    class Net(CountingNet):
        def forward(self, x, t, y=None):
            return 0.5 * x + 0.1 * (y.view(-1, 1, 1, 1).float() + 1)

    def run(interval, w):
        s = samplers.dpmpp_2m(steps=8, guidance_interval=interval, progress=False)
        return s.sample(Net(), d, noise.shape, y=y, noise=noise, guidance_scale=w)

    assert torch.equal(run([0.0, 1e9], 3.0), run(None, 3.0))
    assert torch.equal(run([1e8, 1e9], 3.0), run(None, 1.0))
    assert not torch.equal(run([0.5, 5.0], 3.0), run(None, 3.0))


def test_guidance_interval_bad_values_name_the_key():
    for bad in ([5.0, 0.3], [1.0], "wide", [-1.0, 2.0]):
        with pytest.raises(ValueError, match="sampler.guidance_interval"):
            samplers.dpmpp_2m(guidance_interval=bad)
    s = samplers.heun(steps=4, guidance_interval=[0.3, 5])
    assert s.guidance_interval == (0.3, 5.0) and s.replace(steps=5).guidance_interval == (0.3, 5.0)
    with pytest.raises(ValueError, match="call nfe"):
        s.nfe(True)
    assert s.nfe(False) == 7  # without guidance the interval does not matter
