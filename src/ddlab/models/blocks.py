"""U-Net building blocks.

Every block maps ``(x: (B, C_in, H, W), emb: (B, E), cls: (B, E) or None) -> (B, C_out, H, W)``:
``emb`` is the timestep embedding plus the class embedding, ``cls`` the class embedding alone
(the null-class embedding, which is exactly zero, for unconditional passes; ``None`` for
unconditional models).
Blocks register themselves in ``BLOCKS`` under the name used in ``model.blocks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS: dict[str, Callable[..., nn.Module]] = {}
_POSITIONAL = ("in_channels", "out_channels", "emb_dim")


def block_options(cls) -> set[str]:
    """The keyword options a block constructor takes (beyond ``in_channels, out_channels, emb_dim``)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.name not in ("self", *_POSITIONAL) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def options_for(cls, options: dict) -> dict:
    """The subset of the U-Net-wide block ``options`` that block class ``cls`` uses."""
    known = block_options(cls)
    return {k: v for k, v in options.items() if k in known}


def all_block_options() -> set[str]:
    """Every option some registered block takes (what ``model.<option>`` may name besides the U-Net's own)."""
    return set().union(*(block_options(c) for c in BLOCKS.values()))


def register_block(name: str):
    def deco(cls):
        BLOCKS[name] = cls
        return cls

    return deco


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels``."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under fp16/bf16 autocast), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def norm(channels: int) -> nn.GroupNorm:
    return GroupNorm32(num_groups(channels), channels)


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


@register_block("res")
class ResBlock(nn.Module):
    """Residual block (ADM / improved-DDPM): GroupNorm, SiLU, 3x3 conv; the embedding enters as a
    scale and shift of the second norm (``use_scale_shift_norm``) or is added; dropout, zero-init
    3x3 conv; 1x1 skip when channels change.

    ``updown="down"`` / ``"up"`` makes it ADM's resampling block (``resblock_updown``): the input is
    normalised and activated at its own resolution, then both the hidden path and the skip are
    resampled (2x2 average pooling / nearest x2) before the first conv, so
    ``(B, C_in, H, W) -> (B, C_out, H/2, W/2)`` or ``(B, C_out, 2H, 2W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        updown: str | None = None,
    ):
        super().__init__()
        if updown not in (None, "up", "down"):
            raise ValueError(f"ResBlock updown must be None, 'up' or 'down', got {updown!r}")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.updown = updown
        self.in_layers = nn.Sequential(norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_norm = norm(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.updown == "down":
            return F.avg_pool2d(x, 2)
        if self.updown == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        if self.updown is None:
            h = self.in_layers(x)
        else:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self._resample(h))
            x = self._resample(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, H, W)`` (each pixel normalised on its own, as in
    ConvNeXt), computed in float32 and cast back to the input dtype."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        mean = h.mean(dim=1, keepdim=True)
        var = (h - mean).square().mean(dim=1, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + self.eps)
        return (h * self.weight[:, None, None] + self.bias[:, None, None]).to(x.dtype)


@register_block("conv")
class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022) with time/class injection:
    depthwise 7x7 conv -> channel LayerNorm -> scale/shift by the embedding (or added) ->
    pointwise conv to ``conv_expansion * C_out`` -> GELU -> dropout -> zero-init pointwise conv to
    ``C_out``; residual with a 1x1 skip when channels change. ``(B, C_in, H, W) -> (B, C_out, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        conv_expansion: int = 4,
    ):
        super().__init__()
        if conv_expansion < 1:
            raise ValueError(f"model.conv_expansion must be a positive integer, got {conv_expansion}")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.dwconv = nn.Conv2d(in_channels, in_channels, 7, padding=3, groups=in_channels)
        self.norm = ChannelLayerNorm(in_channels)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * in_channels if use_scale_shift_norm else in_channels))
        hidden = conv_expansion * out_channels
        self.pw1 = nn.Conv2d(in_channels, hidden, 1)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.pw2 = zero_module(nn.Conv2d(hidden, out_channels, 1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.dwconv(x))
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = h * (1 + scale) + shift
        else:
            h = h + e
        h = self.pw2(self.drop(self.act(self.pw1(h))))
        return self.skip(x) + h


def resolve_heads(channels: int, num_heads: int = 4, head_channels: int | None = None) -> int:
    """Number of attention heads for ``channels``: ``channels // head_channels`` when
    ``head_channels`` is set (ADM), else ``num_heads``. Raises naming the key that does not divide."""
    if head_channels is not None:
        if head_channels < 1 or channels % head_channels:
            raise ValueError(
                f"model.head_channels={head_channels} does not divide the {channels} channels of an attention block: "
                f"choose a divisor of every level's channels (base_channels * channel_mult)"
            )
        return channels // head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(
            f"model.num_heads={num_heads} does not divide the {channels} channels of an attention block: "
            f"choose a divisor of every level's channels or set model.head_channels"
        )
    return num_heads


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B * H/w * W/w, w*w, C)``: non-overlapping ``w x w`` windows, row-major
    inside each window; windows ordered (batch, window row, window column)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b * (h // window) * (w // window), window * window, c)


def window_merge(tokens: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * H/w * W/w, w*w, C) -> (B, C, H, W)``."""
    c = tokens.shape[-1]
    x = tokens.reshape(b, h // window, w // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(d)) v`` over ``(N, heads, L, d)`` tensors
    with ``torch.nn.functional.scaled_dot_product_attention``; computed in float32 (also under
    fp16/bf16 autocast, so the softmax never runs in half precision) and cast back to ``q.dtype``."""
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return out.to(dtype)


class WindowSelfAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window x window`` windows (ViT / Swin
    style, no shift). ``window = min(window_size, H)``; ``window_size=None`` means one window
    covering the whole map (global attention, as in ADM). Returns the *update*
    ``(B, C, H, W)`` (zero at initialisation), not ``x + update``."""

    def __init__(self, channels: int, resolution: int, window_size: int | None = 8, num_heads: int = 4, head_channels: int | None = None):
        super().__init__()
        if window_size is not None and window_size < 1:
            raise ValueError(f"model.window_size must be a positive integer or null (global), got {window_size}")
        self.window = resolution if window_size is None else min(int(window_size), resolution)
        if resolution % self.window:
            raise ValueError(
                f"model.window_size={window_size} does not tile the {resolution}x{resolution} feature map: "
                f"choose a window size that divides every attention resolution (e.g. a power of two)"
            )
        self.heads = resolve_heads(channels, num_heads, head_channels)
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        window = self.window
        if h % window or w % window:
            raise ValueError(f"attention window {window} does not tile a {h}x{w} feature map")
        tokens = window_partition(self.qkv(self.norm(x)), window)  # (N, L, 3C)
        n, length, _ = tokens.shape
        q, k, v = tokens.reshape(n, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)  # (N, heads, L, d)
        out = out.transpose(1, 2).reshape(n, length, c)
        return self.proj(window_merge(out, window, b, h, w))


@register_block("atn")
class AttentionBlock(nn.Module):
    """Windowed multi-head self-attention block: ``x + proj(attn(norm(x)))``,
    ``(B, C, H, W) -> (B, C, H, W)``. Keys: ``window_size`` (null = global), ``num_heads`` or
    ``head_channels``. Time and class embeddings are not used."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, resolution: int = 0, window_size: int | None = 8, num_heads: int = 4, head_channels: int | None = None):
        super().__init__()
        if in_channels != out_channels:
            raise ValueError("model.blocks: 'atn' keeps the channel count; put 'res' or 'conv' first in the list")
        self.attn = WindowSelfAttention(in_channels, resolution, window_size, num_heads, head_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, cls: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.attn(x)


@register_block("clsAtn")
class ClassAttentionBlock(nn.Module):
    """Attention that injects the class: ``x + self_attn(x) + cross_attn(x -> class tokens)``.

    The self-attention part is the windowed attention of ``atn``. In the cross-attention part every
    pixel (query, from ``norm(x)``) attends over ``class_tokens`` tokens made from the class embedding
    ``cls: (B, E)`` by bias-free linear maps, and the result goes through a bias-free zero-init 1x1
    projection. The values are therefore linear in ``cls``: for the null class, whose embedding is
    fixed at exactly zero (:class:`~ddlab.models.embeddings.ClassEmbedding`), and for unconditional
    models (``cls=None``) the cross term is exactly zero and the block is the unconditional
    ``x + self_attn(x)``. ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        resolution: int = 0,
        window_size: int | None = 8,
        num_heads: int = 4,
        head_channels: int | None = None,
        class_tokens: int = 4,
    ):
        super().__init__()
        if in_channels != out_channels:
            raise ValueError("model.blocks: 'clsAtn' keeps the channel count; put 'res' or 'conv' first in the list")
        if class_tokens < 1:
            raise ValueError(f"model.class_tokens must be a positive integer, got {class_tokens}")
        c = in_channels
        self.channels = c
        self.class_tokens = class_tokens
        self.self_attn = WindowSelfAttention(c, resolution, window_size, num_heads, head_channels)
        self.heads = resolve_heads(c, num_heads, head_channels)
        self.q_norm = norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.kv = nn.Linear(emb_dim, 2 * class_tokens * c, bias=False)
        self.cross_proj = zero_module(nn.Conv2d(c, c, 1, bias=False))

    def cross(self, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """The class term ``(B, C, H, W)``; exactly zero where ``cls`` is zero."""
        b, c, h, w = x.shape
        d = c // self.heads
        q = self.q(self.q_norm(x)).reshape(b, self.heads, d, h * w).transpose(-1, -2)  # (B, heads, HW, d)
        kv = self.kv(cls.to(x.dtype)).reshape(b, 2, self.class_tokens, self.heads, d).permute(1, 0, 3, 2, 4)
        out = attention(q, kv[0], kv[1])  # (B, heads, HW, d)
        return self.cross_proj(out.transpose(-1, -2).reshape(b, c, h, w))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, cls: torch.Tensor | None = None) -> torch.Tensor:
        out = x + self.self_attn(x)
        if cls is not None:
            out = out + self.cross(x, cls)
        return out


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA-Net's adaptive kernel size: the odd integer nearest ``log2(C) / gamma + b / gamma``."""
    k = int(abs(math.log2(channels) / gamma + b / gamma))
    return k if k % 2 else k + 1


@register_block("chnAtn")
class ChannelAttentionBlock(nn.Module):
    """Efficient channel attention (ECA, Wang et al. 2020): global average pool -> 1D conv across
    channels (kernel from :func:`eca_kernel_size`, no bias) -> gate. The gate is
    ``2 * sigmoid(.)`` with a zero-init conv so the block starts as the identity:
    ``out[b, c] = x[b, c] * 2 * sigmoid(sum_j w_j * mean(x[b, c + j - k//2]))`` (zero-padded across
    channels). ``(B, C, H, W) -> (B, C, H, W)``; embeddings are not used."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int):
        super().__init__()
        if in_channels != out_channels:
            raise ValueError("model.blocks: 'chnAtn' keeps the channel count; put 'res' or 'conv' first in the list")
        k = eca_kernel_size(in_channels)
        self.conv = zero_module(nn.Conv1d(1, 1, k, padding=k // 2, bias=False))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, cls: torch.Tensor | None = None) -> torch.Tensor:
        pooled = x.float().mean(dim=(2, 3))[:, None, :]  # (B, 1, C)
        gate = 2.0 * torch.sigmoid(self.conv(pooled.to(self.conv.weight.dtype)))[:, 0, :, None, None]
        return x * gate.to(x.dtype)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: ``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
