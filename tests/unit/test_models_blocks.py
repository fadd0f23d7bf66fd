"""The block zoo (res, conv, clsAtn, atn, chnAtn) against float64 references written here from the
papers' definitions, plus class dependence, windowing exactness and the U-Net options."""

import math

import pytest
import torch
import torch.nn.functional as F

import ddlab.models.blocks as blocks_mod
from ddlab.models import BLOCKS, UNet, timestep_embedding
from ddlab.models.embeddings import TimeEmbedding

E = 16  # embedding width used by the block tests


def perturb(module, std=0.3, seed=0):
    """Overwrite every parameter with noise so zero-initialised outputs stop hiding mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def gn64(x, gn):
    """GroupNorm in float64 with a module's parameters."""
    return F.group_norm(x.double(), gn.num_groups, gn.weight.double(), gn.bias.double(), gn.eps)


def ref_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64; q (..., L, d), k/v (..., S, d)."""
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def ref_window_self_attention(x, mod, window, heads):
    """Independent float64 reference of WindowSelfAttention: normalise the whole map, project,
    then attend inside each window by explicit slicing (no reshapes shared with the code)."""
    b, c, h, w = x.shape
    qkv = F.conv2d(gn64(x, mod.norm), mod.qkv.weight.double(), mod.qkv.bias.double())
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    d = c // heads
    for i in range(0, h, window):
        for j in range(0, w, window):
            patch = qkv[:, :, i : i + window, j : j + window].flatten(2)  # (B, 3C, L)
            q, k, v = patch[:, :c], patch[:, c : 2 * c], patch[:, 2 * c :]
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                o = ref_attention(q[:, sl].transpose(1, 2), k[:, sl].transpose(1, 2), v[:, sl].transpose(1, 2))
                out[:, sl, i : i + window, j : j + window] = o.transpose(1, 2).reshape(b, d, window, window)
    return F.conv2d(out, mod.proj.weight.double(), mod.proj.bias.double())


# ----------------------------------------------------------------------------- every block
@pytest.mark.parametrize("name", ["res", "conv", "clsAtn", "atn", "chnAtn"])
def test_block_shapes_and_gradients(name):
    torch.manual_seed(0)
    c_in = 16 if name in ("res", "conv") else 8
    from ddlab.models.blocks import options_for

    blk = perturb(BLOCKS[name](c_in, 8, E, **options_for(BLOCKS[name], dict(resolution=8, window_size=4, num_heads=2))))
    x = torch.randn(2, c_in, 8, 8, requires_grad=True)
    emb, cls = torch.randn(2, E), torch.randn(2, E)
    out = blk(x, emb, cls)
    assert out.shape == (2, 8, 8, 8) and out.dtype == torch.float32
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in blk.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_registry_lists_the_five_blocks():
    assert set(BLOCKS) == {"res", "conv", "clsAtn", "atn", "chnAtn"}


# ----------------------------------------------------------------------------- atn
@pytest.mark.parametrize("window_size", [None, 8, 64])
def test_one_window_equals_full_self_attention(window_size):
    torch.manual_seed(1)
    blk = perturb(BLOCKS["atn"](8, 8, E, resolution=8, window_size=window_size, num_heads=2))
    assert blk.attn.window == 8
    x = torch.randn(2, 8, 8, 8)
    # full (global) self-attention written with nothing but matrix products
    qkv = F.conv2d(gn64(x, blk.attn.norm), blk.attn.qkv.weight.double(), blk.attn.qkv.bias.double()).flatten(2)
    q, k, v = (t.reshape(2, 2, 4, 64).transpose(-1, -2) for t in qkv.chunk(3, dim=1))
    full = ref_attention(q, k, v).transpose(-1, -2).reshape(2, 8, 8, 8)
    expected = x.double() + F.conv2d(full, blk.attn.proj.weight.double(), blk.attn.proj.bias.double())
    torch.testing.assert_close(blk(x, None, None).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("res,window", [(8, 4), (16, 4), (16, 8), (32, 8)])
def test_windows_smaller_than_map_match_per_window_reference(res, window):
    torch.manual_seed(2)
    blk = perturb(BLOCKS["atn"](8, 8, E, resolution=res, window_size=window, num_heads=2))
    assert blk.attn.window == window < res
    x = torch.randn(1, 8, res, res)
    expected = x.double() + ref_window_self_attention(x, blk.attn, window, 2)
    torch.testing.assert_close(blk(x, None, None).double(), expected, rtol=1e-4, atol=1e-4)


def _window_permutation(x, window, perm):
    """Move window k of a (B, C, H, W) map to slot perm[k] (windows row-major)."""
    n = x.shape[-1] // window
    out = torch.empty_like(x)
    for k, dst in enumerate(perm.tolist()):
        si, sj = divmod(k, n)
        di, dj = divmod(dst, n)
        out[..., di * window : (di + 1) * window, dj * window : (dj + 1) * window] = x[
            ..., si * window : (si + 1) * window, sj * window : (sj + 1) * window
        ]
    return out


def test_windowed_attention_is_equivariant_to_permuting_windows():
    torch.manual_seed(3)
    blk = perturb(BLOCKS["atn"](8, 8, E, resolution=16, window_size=4, num_heads=2))
    x = torch.randn(2, 8, 16, 16)
    perm = torch.randperm(16)
    a = blk(_window_permutation(x, 4, perm), None, None)
    b = _window_permutation(blk(x, None, None), 4, perm)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("res", [4, 8, 16, 32])
def test_identity_attention_round_trips_every_pixel(res):
    """Queries and keys read a one-hot code of the position inside the window (scaled up), values
    read random content: attention is then (numerically) the identity, so every pixel must get
    back its own content; any scrambled patch would pull content from another pixel."""
    window, code, content = 4, 16, 4
    c = code + content
    blk = BLOCKS["atn"](c, c, E, resolution=res, window_size=window, num_heads=1)
    pos = torch.arange(res)
    idx = (pos[:, None] % window) * window + (pos[None, :] % window)  # (res, res) code index
    x = torch.zeros(1, c, res, res)
    x[0, :code] = F.one_hot(idx, code).permute(2, 0, 1).float()
    x[0, code:] = torch.randn(content, res, res)
    with torch.no_grad():
        attn = blk.attn
        attn.norm.weight.fill_(1.0), attn.norm.bias.zero_()
        w = torch.zeros(3 * c, c)
        w[:code, :code] = 40.0 * torch.eye(code)  # q = scaled code
        w[c : c + code, :code] = 40.0 * torch.eye(code)  # k = scaled code
        w[2 * c + code :, code:] = torch.eye(content)  # v = content
        attn.qkv.weight.copy_(w[:, :, None, None]), attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(c)[:, :, None, None]), attn.proj.bias.zero_()
        out = blk(x, None, None)
    h = gn64(x, attn.norm)
    expected = x[0, code:].double() + h[0, code:]
    torch.testing.assert_close(out[0, code:].double(), expected, rtol=1e-4, atol=1e-4)


def test_softmax_runs_in_float32_under_autocast(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(blocks_mod.F, "scaled_dot_product_attention", spy)
    blk = BLOCKS["clsAtn"](8, 8, E, resolution=8, window_size=4, num_heads=2)
    x = torch.randn(2, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blk(x, None, torch.randn(2, E))
    assert len(seen) == 2  # windowed self-attention and the class cross-attention
    assert all(s == (torch.float32, torch.float32, torch.float32, False) for s in seen), seen
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- clsAtn
def test_class_attention_uses_the_class_and_null_is_exactly_unconditional():
    torch.manual_seed(4)
    blk = perturb(BLOCKS["clsAtn"](8, 8, E, resolution=8, window_size=8, num_heads=2, class_tokens=3))
    x = torch.randn(2, 8, 8, 8)
    c1, c2 = torch.randn(2, E), torch.randn(2, E)
    assert (blk(x, None, c1) - blk(x, None, c2)).abs().max() > 1e-2
    uncond = blk(x, None, None)
    assert torch.equal(blk(x, None, torch.zeros(2, E)), uncond)  # null embedding is exactly zero
    # the unconditional form is x + windowed self-attention (float64 reference)
    torch.testing.assert_close(uncond.double(), x.double() + ref_window_self_attention(x, blk.self_attn, 8, 2), rtol=1e-4, atol=1e-4)
    # the class term is cross-attention from pixels to tokens made from the class embedding
    kv = (c1.double() @ blk.kv.weight.double().T).reshape(2, 2, 3, 2, 4)
    q = F.conv2d(gn64(x, blk.q_norm), blk.q.weight.double(), blk.q.bias.double()).reshape(2, 2, 4, 64).transpose(-1, -2)
    cross = ref_attention(q, kv[:, 0].transpose(1, 2), kv[:, 1].transpose(1, 2)).transpose(-1, -2).reshape(2, 8, 8, 8)
    expected = uncond.double() + F.conv2d(cross, blk.cross_proj.weight.double())
    torch.testing.assert_close(blk(x, None, c1).double(), expected, rtol=1e-4, atol=1e-4)


def _perturb_unet(m, seed=0):
    """Noise on every weight except the null-class row (fixed at zero by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if m.class_embed is not None:
            m.class_embed.embed.weight[m.num_classes].zero_()
    return m


def test_null_class_unet_equals_the_unconditional_unet():
    kw = dict(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), blocks=["res", "clsAtn", "chnAtn"], window_size=4, num_heads=2)
    cond = _perturb_unet(UNet(num_classes=10, **kw))
    uncond = UNet(num_classes=0, **kw)
    missing, unexpected = uncond.load_state_dict(cond.state_dict(), strict=False)
    assert not missing and unexpected == ["class_embed.embed.weight"]
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 400, 999])
    ref = uncond(x, t)
    assert torch.equal(cond(x, t, None), ref)
    assert torch.equal(cond(x, t, torch.full((3,), 10)), ref)
    a, b = cond(x, t, torch.tensor([1, 1, 1])), cond(x, t, torch.tensor([2, 2, 2]))
    assert (a - b).abs().max() > 1e-3 and (a - ref).abs().max() > 1e-3
    # the null row gets no gradient, so training keeps it at zero
    cond(x, t, torch.tensor([3, 10, 10])).square().mean().backward()
    grad = cond.class_embed.embed.weight.grad
    assert grad[10].abs().max() == 0 and grad[3].abs().max() > 0


# ----------------------------------------------------------------------------- chnAtn, conv, res
def test_channel_attention_matches_eca_by_hand():
    torch.manual_seed(5)
    c = 32
    blk = BLOCKS["chnAtn"](c, c, E)
    k = blk.conv.weight.shape[-1]
    assert k == 3  # |log2(32)/2 + 1/2| = 3, odd
    x = torch.randn(2, c, 6, 6)
    assert torch.equal(blk(x, None, None), x)  # zero-init gate 2*sigmoid(0) = 1
    perturb(blk, std=1.0)
    w = blk.conv.weight.double().flatten().tolist()
    mean = x.double().mean(dim=(2, 3))
    gate = torch.zeros(2, c, dtype=torch.float64)
    for ch in range(c):
        s = sum(w[j] * mean[:, ch + j - k // 2] for j in range(k) if 0 <= ch + j - k // 2 < c)
        gate[:, ch] = 2.0 / (1.0 + torch.exp(-s))
    torch.testing.assert_close(blk(x, None, None).double(), x.double() * gate[:, :, None, None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_convnext_block_matches_reference(scale_shift):
    torch.manual_seed(6)
    blk = perturb(BLOCKS["conv"](8, 12, E, use_scale_shift_norm=scale_shift, conv_expansion=2))
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, E)
    h = F.conv2d(x.double(), blk.dwconv.weight.double(), blk.dwconv.bias.double(), padding=3, groups=8)
    h = F.layer_norm(h.permute(0, 2, 3, 1), (8,), blk.norm.weight.double(), blk.norm.bias.double(), eps=1e-6).permute(0, 3, 1, 2)
    e = F.linear(F.silu(emb.double()), blk.emb_layers[1].weight.double(), blk.emb_layers[1].bias.double())[:, :, None, None]
    h = h * (1 + e[:, :8]) + e[:, 8:] if scale_shift else h + e
    h = F.gelu(F.conv2d(h, blk.pw1.weight.double(), blk.pw1.bias.double()))
    assert blk.pw1.out_channels == 24
    h = F.conv2d(h, blk.pw2.weight.double(), blk.pw2.bias.double())
    expected = F.conv2d(x.double(), blk.skip.weight.double(), blk.skip.bias.double()) + h
    torch.testing.assert_close(blk(x, emb, None).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("direction", ["down", "up"])
def test_resblock_updown_follows_adm_order(direction):
    """ADM: normalise and activate at the input resolution, then resample hidden path and skip."""
    torch.manual_seed(7)
    blk = perturb(BLOCKS["res"](8, 8, E, updown=direction))
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, E)

    def resample(t):
        if direction == "down":  # 2x2 mean by hand
            return (t[..., 0::2, 0::2] + t[..., 1::2, 0::2] + t[..., 0::2, 1::2] + t[..., 1::2, 1::2]) / 4
        return t.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)

    conv1, lin, conv2 = blk.in_layers[2], blk.emb_layers[1], blk.out_layers[2]
    h = resample(F.silu(gn64(x, blk.in_layers[0])))
    h = F.conv2d(h, conv1.weight.double(), conv1.bias.double(), padding=1)
    e = F.linear(F.silu(emb.double()), lin.weight.double(), lin.bias.double())[:, :, None, None]
    h = gn64(h, blk.out_norm) * (1 + e[:, :8]) + e[:, 8:]
    h = F.conv2d(F.silu(h), conv2.weight.double(), conv2.bias.double(), padding=1)
    expected = resample(x.double()) + h
    out = blk(x, emb, None)
    assert out.shape == (2, 8, 4, 4) if direction == "down" else (2, 8, 16, 16)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- U-Net options
def _tiny(**kw):
    args = dict(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), blocks=["res", "conv", "clsAtn", "atn", "chnAtn"], num_classes=10, window_size=2, num_heads=2)
    args.update(kw)
    return UNet(**args)


def test_gradient_checkpointing_gives_identical_gradients():
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    grads = []
    for ckpt in (False, True):
        m = _perturb_unet(_tiny(gradient_checkpointing=ckpt, dropout=0.2, resblock_updown=True))
        m.train()
        torch.manual_seed(11)  # same dropout masks; checkpointing replays the RNG state
        m(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_channels_last_matches_contiguous():
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    a = _perturb_unet(_tiny())
    b = _perturb_unet(_tiny(channels_last=True))
    assert b.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b(x, t, y), a(x, t, y), rtol=1e-4, atol=1e-5)


def test_pad_input_equals_padding_by_hand():
    m28 = _perturb_unet(_tiny(image_size=28, channel_mult=(1, 1, 1, 1), blocks=["res", "clsAtn"], attention_resolutions=[4], pad_input=True))
    m32 = _tiny(image_size=32, channel_mult=(1, 1, 1, 1), blocks=["res", "clsAtn"], attention_resolutions=[4])
    m32.load_state_dict(m28.state_dict())
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([5, 500]), torch.tensor([4, 7])
    out = m28(x, t, y)
    assert out.shape == (2, 1, 28, 28)
    torch.testing.assert_close(out, m32(F.pad(x, (2, 2, 2, 2)), t, y)[..., 2:30, 2:30])


def test_compile_flag_compiles_in_place_and_keeps_state_dict_keys():
    plain, compiled = _tiny(), _tiny(compile=True)
    assert plain._compiled_call_impl is None and compiled._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(head_channels=3), "model.head_channels"),
        (dict(num_heads=3), "model.num_heads"),
        (dict(image_size=24, window_size=5), "model.window_size"),
        (dict(image_size=28, channel_mult=(1, 2, 2), window_size=4), "model.window_size"),
        (dict(attention_resolutions=[64]), "model.attention_resolutions"),
        (dict(class_tokens=0), "model.class_tokens"),
        (dict(image_size=28, channel_mult=(1, 2, 2, 2)), "model.pad_input"),
        (dict(image_size=4, channel_mult=(1, 2, 2, 2), pad_input=True), "model.channel_mult"),
        (dict(blocks=["atn", "res"]), "model.blocks"),
    ],
)
def test_impossible_combinations_fail_at_construction_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _tiny(**kw)


# ----------------------------------------------------------------------------- time embedding
def test_timestep_embedding_matches_float64_closed_form_and_range():
    t = torch.tensor([0, 1, 17, 250, 999])
    dim, half = 32, 16
    freqs = torch.tensor([10000.0 ** (-i / (half - 1)) for i in range(half)], dtype=torch.float64)
    assert freqs[0] == 1.0 and abs(freqs[-1] - 1e-4) < 1e-12  # 1 down to 1/10000, never above 1
    args = t.double()[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    e = timestep_embedding(t, dim)
    torch.testing.assert_close(e.double(), expected, rtol=0, atol=2e-4)
    big = timestep_embedding(torch.linspace(0, 999, 4000), dim)
    assert big.abs().max() <= 1.0 and torch.allclose(big.square().sum(1), torch.full((4000,), float(half)))


def test_time_embedding_is_smooth_lipschitz_bound():
    """||phi(t + d) - phi(t)|| <= d * sqrt(sum f_i^2) for the sinusoid (|d/dt cos(f t)| <= f); the MLP
    multiplies the bound by ||W2|| * 1.1 * ||W1|| (SiLU is 1.1-Lipschitz)."""
    torch.manual_seed(8)
    dim, half = 32, 16
    lip = math.sqrt(sum(10000.0 ** (-2 * i / (half - 1)) for i in range(half)))
    t = torch.linspace(0, 999, 2000)
    dt = t[1] - t[0]
    e = timestep_embedding(t, dim)
    step = (e[1:] - e[:-1]).norm(dim=1)
    assert step.max() <= lip * dt * 1.001
    te = TimeEmbedding(dim, 64)
    w1, w2 = te.mlp[0].weight, te.mlp[2].weight
    bound = torch.linalg.matrix_norm(w2, 2) * 1.1 * torch.linalg.matrix_norm(w1, 2) * lip * dt
    with torch.no_grad():
        out = te(t)
    assert out.shape == (2000, 64)
    assert ((out[1:] - out[:-1]).norm(dim=1)).max() <= bound
    # and not constant: distant timesteps are farther apart than neighbours
    assert (out[0] - out[-1]).norm() > 2 * (out[1:] - out[:-1]).norm(dim=1).mean()


def test_blocks_refuse_options_they_do_not_take():
    with pytest.raises(TypeError, match="window_size"):
        BLOCKS["res"](8, 8, E, window_size=4)


def test_misspelt_model_option_is_refused_naming_it_and_the_valid_ones():
    import pytest

    from ddlab.models import UNet
    from tests.conftest import compose

    with pytest.raises(ValueError, match=r"unknown option\(s\) 'chanels'; valid options: image_size.*base_channels.*window_size"):
        UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,), chanels=64)
    from hydra.utils import instantiate

    cfg = compose(["+model.chanels=64"])  # Hydra's own hint for a key the preset lacks
    with pytest.raises(Exception, match="chanels"):
        instantiate(cfg.model)
