"""diffusers' UNet2DModel inside ddlab (model=diffusers_unet2d) and the model contract checked at build time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddlab.models.contract import check_model_contract
from tests.conftest import SHARED_DATA, compose

diffusers = pytest.importorskip("diffusers")
from ddlab.interop import DiffusersUNet2D  # noqa: E402

TINY_UNET = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])
TINY_CLI = ["model=diffusers_unet2d", "model.block_out_channels=[16,32]", "model.layers_per_block=1", "model.norm_num_groups=8",
            "model.down_block_types=[DownBlock2D,AttnDownBlock2D]", "model.up_block_types=[AttnUpBlock2D,UpBlock2D]"]
TRAIN = ["data.image_size=16", "data.resize=resize", "data.limit=16", "data.val_limit=8", "data.batch_size=8",
         "scheduler.num_timesteps=20", "sampler.steps=2", "sampler.progress=false", "trainer.max_time=null",
         "trainer.limit_val_batches=1", "callbacks.progress_bar=null", "callbacks.sample_grid.every_n_steps=0",
         "callbacks.sample_grid.at_end=false", "callbacks.checkpoint.every_n_steps=2", "logger=csv"]


def test_wrapper_is_unet2dmodel_with_a_null_class():
    torch.manual_seed(0)
    m = DiffusersUNet2D(image_size=16, in_channels=1, num_classes=3, **TINY_UNET)
    assert (m.image_size, m.in_channels, m.out_channels, m.num_classes) == (16, 1, 1, 3)
    ref = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, num_class_embeds=4, **TINY_UNET)
    ref.load_state_dict(m.unet.state_dict())  # the same weights in a bare diffusers model
    with torch.no_grad():
        for p in ref.parameters():  # leave zero-initialised layers behind, identically in both
            p.add_(torch.randn_like(p) * 0.05)
        m.unet.load_state_dict(ref.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 17])
    y = torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y), ref(x, t, class_labels=y).sample)
        torch.testing.assert_close(m(x, t), ref(x, t, class_labels=torch.tensor([3, 3])).sample)  # y=None: the null class
        assert (m(x, t, torch.tensor([1, 1])) - m(x, t, torch.tensor([2, 2]))).abs().max() > 1e-4


def test_wrapper_refuses_bad_options():
    with pytest.raises(ValueError, match="model.block_out_channel: not an option of diffusers.UNet2DModel; choose from .*block_out_channels"):
        DiffusersUNet2D(image_size=16, in_channels=1, block_out_channel=[16, 32])
    with pytest.raises(ValueError, match="model.num_class_embeds: set by ddlab from model.num_classes"):
        DiffusersUNet2D(image_size=16, in_channels=1, num_class_embeds=4, **TINY_UNET)
    with pytest.raises(ValueError, match="image_size=18 is not divisible by .* = 4"):
        DiffusersUNet2D(image_size=18, in_channels=1, **{**TINY_UNET, "block_out_channels": [16, 32, 32],
                                                         "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3})
    m = DiffusersUNet2D(image_size=16, in_channels=1, **TINY_UNET)
    with pytest.raises(ValueError, match="unconditional model"):
        m(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([0]))


class _Bare(nn.Module):
    """A diffusers UNet2DModel put in as is: forward returns an output object."""

    def __init__(self):
        super().__init__()
        self.unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, **TINY_UNET)
        self.image_size, self.in_channels = 16, 1

    def forward(self, x, t, y=None):
        return self.unet(x, t)


def test_contract_refuses_objects_wrong_channels_and_missing_attributes():
    with pytest.raises(TypeError, match=r"model _Bare: forward\(x, t, y\) returned a UNet2DOutput, expected a tensor of shape \(1, 1, 16, 16\).*diffusers_unet2d"):
        check_model_contract(_Bare(), 16, 1, 1)
    good = DiffusersUNet2D(image_size=16, in_channels=1, **TINY_UNET)
    check_model_contract(good, 16, 1, 1)
    with pytest.raises(ValueError, match=r"returned shape \(1, 1, 16, 16\), expected \(1, 2, 16, 16\)"):
        check_model_contract(good, 16, 1, 2)  # learned variances need 2C outputs
    conv = nn.Conv2d(1, 1, 3, padding=1)
    no_attrs = type("NoAttrs", (nn.Module,), {"__init__": lambda self: (nn.Module.__init__(self), setattr(self, "c", conv))[0],
                                              "forward": lambda self, x, t, y=None: self.c(x)})()
    with pytest.raises(TypeError, match="model NoAttrs has no attribute `image_size`"):
        check_model_contract(no_attrs, 16, 1, 1)


def test_train_refuses_a_bare_diffusers_model_before_training(tmp_path, mnist_dir):
    from ddlab.train import train

    bare = ["model=diffusers_unet2d", "model._target_=diffusers.UNet2DModel", "~model.image_size", "~model.num_classes",
            "~model.gradient_checkpointing", "+model.sample_size=16", *TINY_CLI[1:]]
    cfg = compose([*TRAIN, "data.num_classes=0", *bare, "trainer.max_steps=1"], output_dir=tmp_path)
    with pytest.raises(TypeError, match=r"model UNet2DModel: forward\(x, t, y\) returned a UNet2DOutput, expected a tensor of shape \(1, 1, 16, 16\)"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_diffusers_unet_trains_resumes_and_samples_with_guidance(tmp_path, mnist_dir):
    from ddlab.sample import sample
    from ddlab.train import train

    run = tmp_path / "run"
    train(compose([*TRAIN, *TINY_CLI, "trainer.max_steps=2"], output_dir=run))
    step2 = run / "checkpoints" / "last.ckpt"
    assert step2.is_file()
    resumed = tmp_path / "resumed"
    train(compose([*TRAIN, *TINY_CLI, "trainer.max_steps=4", f"ckpt_path={step2}"], output_dir=resumed))
    ck = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 4 and any(k.startswith("model.unet.") for k in ck["state_dict"])
    res = sample(compose([f"ckpt={resumed / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 's'}", "n=4", "batch_size=4",
                          "sampler.steps=2", "progress=false", "sampler.guidance_scale=2", "labels=[3]"],
                         config_name="sample"))
    assert res["images"].shape == (4, 16, 16, 1) and res["labels"].tolist() == [3, 3, 3, 3]
    from ddlab.nll import nll

    rec = nll(compose([f"ckpt={resumed / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'nll'}", "n=2", "batch_size=2",
                       "progress=false"], config_name="nll"))
    assert rec["bpd"] == pytest.approx(rec["bpd_prior"] + rec["bpd_vb"] + rec["bpd_decoder"], rel=1e-6)
    assert 0 < rec["bpd"] < float("inf")


@pytest.mark.slow
def test_butterflies_tutorial_recipe_and_one_step(tmp_path):
    c = compose(["experiment=butterflies_tutorial"], output_dir=tmp_path)
    assert (c.data.image_size, c.data.batch_size, c.trainer.max_epochs, c.trainer.precision) == (128, 16, 50, "16-mixed")
    assert list(c.model.block_out_channels) == [128, 128, 256, 256, 512, 512] and c.model.layers_per_block == 2
    assert c.model.down_block_types[4] == "AttnDownBlock2D" and c.model.up_block_types[1] == "AttnUpBlock2D"
    assert [b for b in c.model.down_block_types + c.model.up_block_types if b.startswith("Attn")] == ["AttnDownBlock2D", "AttnUpBlock2D"]
    assert (c.module.optimizer.lr, c.module.lr_scheduler.warmup_steps, c.module.lr_scheduler.decay) == (1e-4, 500, "cosine")
    assert (c.scheduler.schedule, c.scheduler.num_timesteps, c.sampler._target_) == ("linear", 1000, "ddlab.diffusion.samplers.ddpm")
    assert c.callbacks.ema is not None and c.data.num_classes == 0
    # ddlab's parts swap in unchanged: nothing model- or schedule-specific is pinned by the recipe
    swapped = compose(["experiment=butterflies_tutorial", "model=unet_adm", "model.base_channels=8", "model.head_channels=8",
                       "model.num_blocks=1", "model.channel_mult=[1,1,2,2,4,4]", "scheduler=cosine", "sampler=dpmpp_2m"], output_dir=tmp_path)
    from hydra.utils import instantiate

    assert type(instantiate(swapped.model)).__name__ == "UNet" and swapped.scheduler.schedule == "cosine"
    assert swapped.module.optimizer.lr == 1e-4 and swapped.sampler._target_ == "ddlab.diffusion.samplers.dpmpp_2m"
    from ddlab.train import train

    tiny = ["trainer=cpu", "trainer.precision=32-true", "trainer.max_epochs=null", "trainer.max_steps=1", "data.image_size=16",
            f"data.path={SHARED_DATA / 'butterflies_leeds'}", "data.limit=4", "data.val_limit=2", "data.batch_size=2",
            "data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false", "scheduler.num_timesteps=50", "sampler.steps=2",
            "callbacks.sample_grid.n=2", "callbacks.progress_bar=null", "trainer.limit_val_batches=1", "logger=csv",
            *[o for o in TINY_CLI[1:] if "block_types" not in o],
            "model.down_block_types=[AttnDownBlock2D,DownBlock2D]", "model.up_block_types=[UpBlock2D,AttnUpBlock2D]"]
    train(compose(["experiment=butterflies_tutorial", *tiny], output_dir=tmp_path))
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
