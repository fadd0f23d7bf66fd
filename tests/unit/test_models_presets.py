"""Every model preset in configs/model, composed with the real Hydra configs at small width:
construction at every supported size, shapes, gradients, class dependence, errors naming keys,
and a tiny preset overfitting 8 real MNIST digits."""

import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from tests.conftest import CONFIG_DIR, compose

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if not p.stem.startswith("diffusers_"))  # those: test_interop_models.py
SMALL = ["model.base_channels=8", "++model.head_channels=null", "++model.num_heads=2"]


def build(name, *overrides):
    cfg = compose([f"model={name}", *SMALL, *overrides])
    return instantiate(cfg.model), cfg


def test_the_six_presets_exist():
    assert {"unet_res_conv", "unet_res", "unet_res_res", "unet_res_res_atn", "unet_res_large", "unet_adm", "unet_res_mnist"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_shapes_gradients_and_class_dependence(name):
    torch.manual_seed(0)
    m, _ = build(name, "data.image_size=32", "model.num_blocks=1", "model.dropout=0.0")
    assert m.image_size == 32 and m.in_channels == 1 and m.num_classes == 10
    with torch.no_grad():  # leave the zero-initialised output layers behind
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        m.class_embed.embed.weight[10].zero_()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 900])
    out = m(x, t, torch.tensor([3, 10]))
    assert out.shape == (2, 1, 32, 32)
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0) and n != "class_embed.embed.weight"]
    assert not missing, missing
    with torch.no_grad():
        a, b = m(x, t, torch.tensor([1, 1])), m(x, t, torch.tensor([7, 7]))
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "unet_res_mnist"])
@pytest.mark.parametrize("size", [28, 32, 64, 128])
def test_preset_builds_for_every_supported_size(name, size):
    m, cfg = build(name, f"data.image_size={size}", "model.num_blocks=1")
    assert m.image_size == size and m.inner_size % 8 == 0 and m.inner_size - size < 8
    # the blocks the preset names are really there
    kinds = {type(mod).__name__ for mod in m.modules()}
    expected = {"res": "ResBlock", "conv": "ConvNeXtBlock", "clsAtn": "ClassAttentionBlock", "atn": "AttentionBlock", "chnAtn": "ChannelAttentionBlock"}
    assert {expected[b] for b in cfg.model.blocks} <= kinds


def test_learned_variance_doubles_output_channels():
    m, _ = build("unet_res", "data.image_size=32", "model.num_blocks=1", "scheduler.variance=learned_range")
    assert m.out_channels == 2
    assert m(torch.randn(1, 1, 32, 32), torch.tensor([5]), torch.tensor([2])).shape == (1, 2, 32, 32)


def test_adm_reference_layout():
    """guided-diffusion ImageNet-64: attention at 32/16/8 only, 64-channel heads, residual up/down."""
    cfg = compose(["model=unet_adm", "data.image_size=64"])
    assert cfg.model.head_channels == 64 and cfg.model.resblock_updown and cfg.model.use_scale_shift_norm
    assert list(cfg.model.attention_resolutions) == [32, 16, 8] and cfg.model.window_size is None
    m, _ = build("unet_adm", "data.image_size=64", "model.head_channels=8", "model.num_blocks=1")
    attn_sizes = sorted({blk.attn.window for blk in m.modules() if type(blk).__name__ == "AttentionBlock"})
    assert attn_sizes == [8, 16, 32]  # global attention (window = map) at exactly those sizes
    assert {blk.attn.heads for blk in m.modules() if type(blk).__name__ == "AttentionBlock"} == {2, 3, 4}  # 16/8, 24/8, 32/8
    updown = [blk.updown for blk in m.modules() if type(blk).__name__ == "ResBlock" and blk.updown]
    assert updown == ["down"] * 3 + ["up"] * 3


def test_adm_full_width_parameter_count():
    """At full width (192 ch, 3 blocks, [1,2,3,4], 3 input / 6 output channels, 1000 classes) the
    count is within 1% of guided-diffusion's published ImageNet-64 model (~296 M)."""
    cfg = compose(["model=unet_adm", "data.image_size=64"])
    from ddlab.models import UNet

    kw = {k: v for k, v in cfg.model.items() if k not in ("_target_", "in_channels", "out_channels", "num_classes")}
    with torch.device("meta"):
        m = UNet(in_channels=3, out_channels=6, num_classes=1000, **kw)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 296e6) / 296e6 < 0.01, n


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model=unet_res", "model.window_size=3"], "model.window_size"),
        (["model=unet_adm", "data.image_size=64"], "model.head_channels"),  # 64-ch heads vs 8*[1,2,3,4]
        (["model=unet_res", "model.pad_input=false", "data.image_size=28"], "model.pad_input"),
        (["model=unet_adm", "model.head_channels=8", "model.attention_resolutions=[3]"], "model.attention_resolutions"),
    ],
)
def test_impossible_preset_overrides_fail_naming_the_key(overrides, key):
    cfg = compose([*overrides[:1], "model.base_channels=8", *overrides[1:]])
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        instantiate(cfg.model)


def load_digits(mnist_dir, n=8):
    """The first n training digits read straight from the official IDX file: (n, 1, 32, 32) in [-1, 1]."""
    with gzip.open(mnist_dir / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    assert int.from_bytes(raw[:4], "big") == 2051
    imgs = np.frombuffer(raw, dtype=np.uint8, count=n * 784, offset=16).reshape(n, 1, 28, 28)
    with gzip.open(mnist_dir / "train-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, count=n, offset=8)
    x = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0)
    return F.pad(x, (2, 2, 2, 2), value=-1.0), torch.from_numpy(labels.astype(np.int64))


def test_tiny_preset_overfits_a_batch_of_mnist_digits(mnist_dir):
    """Fixed (x_t, t, eps) for 8 real digits (2x2-average-pooled to 16 px to keep it fast): the
    eps-prediction MSE must fall 10x."""
    torch.manual_seed(0)
    x0, y = load_digits(mnist_dir)
    assert y.tolist() == [5, 0, 4, 1, 9, 2, 1, 3]  # the famous first MNIST labels
    x0 = F.avg_pool2d(x0, 2)
    cfg = compose(["model=unet_res", "model.base_channels=8", "model.num_heads=2", "model.num_blocks=1", "model.channel_mult=[1,2]", "data.image_size=16"])
    model = instantiate(cfg.model)
    diffusion = instantiate(cfg.scheduler)
    t = torch.tensor([50, 120, 200, 300, 400, 500, 600, 700])
    noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, t, noise)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x_t, t, y), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5  # an untrained net is near the eps variance
    assert min(losses[-5:]) < losses[0] / 10, (losses[0], losses[-5:])
