"""Training with ``scheduler=edm``: every ddlab U-Net, the training module's EDM branch, and a few
steps through ``python -m ddlab.train`` that checkpoint, resume exactly and reload with load_checkpoint."""

import functools
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from ddlab.diffusion import EDM, LossAwareSampler, samplers
from ddlab.training import DiffusionModule
from tests.conftest import CONFIG_DIR, ROOT, compose

MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if not p.stem.startswith("diffusers_"))  # ddlab U-Nets (diffusers: test_interop_models)
# the default sampler of scheduler=edm is heun (the sigma-space samplers); these runs draw no grids
EDM_NO_GRIDS = ["scheduler=edm", "sampler=ddim", "callbacks.sample_grid=null"]


@pytest.mark.parametrize("name", MODELS)
def test_every_unet_trains_under_edm(name, tmp_path):
    tiny = [f"model={name}", "data.image_size=8", "model.base_channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1"]
    cfg = compose(EDM_NO_GRIDS + tiny, output_dir=tmp_path)
    if cfg.model.get("head_channels"):
        cfg = compose(EDM_NO_GRIDS + tiny + ["model.head_channels=8"], output_dir=tmp_path)
    edm, model = instantiate(cfg.scheduler), instantiate(cfg.model)
    assert isinstance(edm, EDM) and model.out_channels == cfg.data.channels  # no learned variance
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, cfg.data.channels, 8, 8, generator=g) * 2 - 1
    y = torch.tensor([1, cfg.data.num_classes]) if cfg.data.num_classes else None  # a label and the null class
    terms = edm.training_losses(model, x, edm.sample_sigma(2, generator=g), y)
    terms["loss"].mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)


def test_bits_per_dim_callback_refuses_edm_before_training(tmp_path):
    from ddlab.training import BitsPerDim

    with pytest.raises(ValueError, match="bits/dim is not defined for scheduler=edm.*callbacks.bpd.every_n_epochs=0"):
        BitsPerDim(every_n_epochs=1).on_fit_start(None, _module())
    BitsPerDim(every_n_epochs=0).on_fit_start(None, _module())  # off: nothing to refuse


def _module(**kw):
    net = instantiate(compose(EDM_NO_GRIDS + ["model.base_channels=8", "model.channel_mult=[1,2]", "data.image_size=8"]).model)
    return DiffusionModule(net, EDM(), samplers.ddim(steps=2, progress=False), **kw)


def test_module_refuses_loss_aware_and_discrete_samplers():
    with pytest.raises(ValueError, match="timestep_sampler=loss_aware.*scheduler=edm"):
        _module(timestep_sampler=functools.partial(LossAwareSampler, history=2))
    with pytest.raises(ValueError, match="sampler 'ddim' steps through the timesteps of a discrete VP process.*sampler=heun"):
        _module().sample(2)


TINY = [
    "model.base_channels=8", "model.channel_mult=[1,2]", "data.limit=32", "data.val_limit=8", "data.batch_size=8",
    "trainer.max_time=null", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.progress_bar=null",
    "module.lr_scheduler.warmup_steps=2", "logger=csv", "torch_threads=2", "callbacks.checkpoint.every_n_steps=2",
    "callbacks.checkpoint.keep=-1", "scheduler.sigma_data=0.6",
]


def _cli(out, *overrides):
    """``python -m ddlab.train`` in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [*EDM_NO_GRIDS, *TINY, f"paths.output_dir={out}", f"hydra.run.dir={out}", *overrides]
    r = subprocess.run([sys.executable, "-m", "ddlab.train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "checkpoints"


def _in_process(out, *overrides):
    from ddlab.train import train

    train(compose(EDM_NO_GRIDS + TINY + list(overrides), output_dir=out))
    return out / "checkpoints"


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_cli_trains_checkpoints_resumes_and_reloads(tmp_path):
    from ddlab.checkpoint import load_checkpoint

    full = _cli(tmp_path / "full", "trainer.max_steps=6")
    first = _in_process(tmp_path / "part", "trainer.max_steps=4")
    resumed = _in_process(tmp_path / "resumed", "trainer.max_steps=6", f"ckpt_path={first / 'step_000004.ckpt'}")
    assert sorted(p.name for p in full.glob("step_*.ckpt")) == ["step_000002.ckpt", "step_000004.ckpt", "step_000006.ckpt"]
    ck = torch.load(resumed / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 6
    # exact resume: sigma and noise come from the per-step generator, so 4 + 2 steps equal 6
    a, b = _weights(full / "last.ckpt"), ck["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # load_checkpoint rebuilds the formulation from the stored config, with EMA weights
    loaded = load_checkpoint(resumed / "last.ckpt")
    assert isinstance(loaded.diffusion, EDM) and loaded.diffusion.sigma_data == 0.6 and loaded.global_step == 6
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, b["ema_model." + k])
    x = torch.zeros(2, 1, 32, 32)
    d = loaded.diffusion.denoise(loaded.model, x, torch.tensor([0.5, 10.0]), torch.tensor([3, 10]))
    assert d.shape == x.shape and torch.isfinite(d).all()
    # the sample CLI draws from it with a sigma-space sampler (the run trained without grids: pick heun)
    from ddlab.sample import sample

    out = sample(compose([f"ckpt={resumed / 'last.ckpt'}", f"out={tmp_path / 's'}", "n=3", "batch_size=2", "progress=false",
                          "sampler=heun", "sampler.steps=2", "sampler.guidance_scale=1.5", "labels=[3]"], config_name="sample"))
    assert out["images"].shape == (3, 32, 32, 1) and out["sampler"]["name"] == "heun" and out["guidance_scale"] == 1.5
    with pytest.raises(ValueError, match="sigma-space sampler"):  # ddim needs a discrete VP process
        sample(compose([f"ckpt={resumed / 'last.ckpt'}", f"out={tmp_path / 't'}", "n=2", "progress=false", "sampler=ddim"],
                       config_name="sample"))
