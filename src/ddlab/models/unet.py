"""A U-Net assembled from an ordered list of block names (``model.blocks``)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import BLOCKS, Downsample, ResBlock, Upsample, norm, zero_module
from .embeddings import ClassEmbedding, TimeEmbedding

# Blocks that may change the channel count (they start every unit).
CHANNEL_CHANGING = ("res", "conv")


class Unit(nn.Module):
    """The ``blocks`` sequence applied once at one resolution: ``(B, C_in, H, W) -> (B, C_out, H, W)``.
    The first block maps ``C_in -> C_out``; the rest keep ``C_out``."""

    def __init__(self, names: Sequence[str], in_channels: int, out_channels: int, emb_dim: int, resolution: int, **block_kwargs):
        super().__init__()
        layers = []
        for i, name in enumerate(names):
            c_in = in_channels if i == 0 else out_channels
            layers.append(BLOCKS[name](c_in, out_channels, emb_dim, resolution=resolution, **block_kwargs))
        self.layers = nn.ModuleList(layers)

    def forward(self, x, emb, cls):
        for layer in self.layers:
            x = layer(x, emb, cls)
        return x


class UNet(nn.Module):
    """Noise-prediction U-Net.

    Args:
        image_size: input height = width (e.g. 28, 32, 64, 128); must be divisible by
            ``2 ** (len(channel_mult) - 1)``.
        in_channels: image channels C.
        out_channels: output channels (C, or 2C for learned variance); default ``in_channels``.
        base_channels: channels of the first level.
        channel_mult: per-level multipliers of ``base_channels``; one level per entry.
        blocks: ordered block names applied in every unit, e.g. ``[res, clsAtn, chnAtn]``; the
            first must be one of ``res``/``conv`` (it changes the channel count).
        num_blocks: units per level on the way down (``num_blocks + 1`` on the way up).
        num_classes: number of classes (0 = unconditional); index ``num_classes`` is the null class.
        dropout: dropout inside residual blocks.
        attention_resolutions: resolutions where attention blocks (``atn``, ``clsAtn``) are kept;
            ``None`` keeps them at every level.
        gradient_checkpointing: recompute each unit in backward to save memory.
        channels_last: keep weights and activations in channels-last memory format.
        Other keyword arguments (``window_size``, ``num_heads``, ``head_channels``, ...) go to blocks.

    ``forward(x: (B, C, H, W) float, t: (B,) int, y: (B,) int or None) -> (B, out_channels, H, W)``.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: Optional[int] = None,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        blocks: Sequence[str] = ("res",),
        num_blocks: int = 1,
        num_classes: int = 0,
        dropout: float = 0.0,
        attention_resolutions: Optional[Sequence[int]] = None,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        **block_kwargs,
    ):
        super().__init__()
        blocks = list(blocks)
        channel_mult = list(channel_mult)
        self._validate(image_size, in_channels, base_channels, channel_mult, blocks, num_blocks, num_classes, dropout)
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = int(num_classes)
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = channels_last
        attn_res = None if attention_resolutions is None else {int(r) for r in attention_resolutions}

        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, emb_dim)
        self.class_embed = ClassEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        kw = dict(dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, **block_kwargs)

        def names_at(res: int):
            if attn_res is None or res in attn_res:
                return blocks
            return [b for b in blocks if b not in ("atn", "clsAtn")]

        def down_op(ch, res):
            if resblock_updown:
                return _ResampleRes(ch, emb_dim, "down", **kw)
            return Downsample(ch)

        def up_op(ch, res):
            if resblock_updown:
                return _ResampleRes(ch, emb_dim, "up", **kw)
            return Upsample(ch)

        ch = base_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [ch]
        res = image_size
        for level, mult in enumerate(channel_mult):
            out_ch = base_channels * mult
            for _ in range(num_blocks):
                self.down.append(Unit(names_at(res), ch, out_ch, emb_dim, res, **kw))
                ch = out_ch
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(down_op(ch, res))
                res //= 2
                skip_channels.append(ch)
        self.mid = nn.ModuleList([Unit(names_at(res), ch, ch, emb_dim, res, **kw), ResBlock(ch, ch, emb_dim, **kw)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = base_channels * mult
            for i in range(num_blocks + 1):
                self.up.append(Unit(names_at(res), ch + skip_channels.pop(), out_ch, emb_dim, res, **kw))
                ch = out_ch
            if level > 0:
                self.up.append(up_op(ch, res))
                res *= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)))
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @staticmethod
    def _validate(image_size, in_channels, base_channels, channel_mult, blocks, num_blocks, num_classes, dropout):
        if not blocks:
            raise ValueError("model.blocks is empty; give an ordered list such as [res, clsAtn, chnAtn]")
        for b in blocks:
            if b not in BLOCKS:
                raise ValueError(f"model.blocks: unknown block {b!r}; choose from {', '.join(BLOCKS)}")
        if blocks[0] not in CHANNEL_CHANGING:
            raise ValueError(f"model.blocks must start with one of {', '.join(CHANNEL_CHANGING)} (it changes the channel count), got {blocks[0]!r}")
        if not channel_mult or any(int(m) < 1 for m in channel_mult):
            raise ValueError(f"model.channel_mult must be a non-empty list of positive integers, got {channel_mult}")
        if base_channels < 1 or in_channels < 1 or num_blocks < 1:
            raise ValueError("model.base_channels, model.in_channels and model.num_blocks must be positive")
        if num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must lie in [0, 1), got {dropout}")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image size {image_size} is not divisible by 2**(len(model.channel_mult) - 1) = {factor}: "
                f"use fewer levels in model.channel_mult or set data.image_size to a multiple of {factor}"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet built for (B, {self.in_channels}, {self.image_size}, {self.image_size}) inputs, got {tuple(x.shape)}"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = self.time_embed(t)
        cls = None
        if self.class_embed is not None:
            cls = self.class_embed(y, x.shape[0], x.device)
            emb = emb + cls
        elif y is not None:
            raise ValueError("labels were given to an unconditional model (model.num_classes=0)")
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, emb, cls)
            skips.append(h)
        for layer in self.mid:
            h = self._run(layer, h, emb, cls)
        for layer in self.up:
            if isinstance(layer, Unit):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layer, h, emb, cls)
        return self.out(h)

    def _run(self, layer: nn.Module, h, emb, cls):
        if isinstance(layer, (Downsample, Upsample)):
            return layer(h)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, emb, cls, use_reentrant=False)
        return layer(h, emb, cls)


class _ResampleRes(nn.Module):
    """Residual block that also down- or up-samples (ADM's ``resblock_updown``)."""

    def __init__(self, channels: int, emb_dim: int, direction: str, **kw):
        super().__init__()
        self.block = ResBlock(channels, channels, emb_dim, **kw)
        self.direction = direction

    def forward(self, x, emb, cls=None):
        if self.direction == "down":
            x = nn.functional.avg_pool2d(x, 2)
        else:
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.block(x, emb, cls)
