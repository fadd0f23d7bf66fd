"""A U-Net assembled from an ordered list of block names (``model.blocks``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import BLOCKS, Downsample, ResBlock, Upsample, all_block_options, norm, options_for, zero_module
from .embeddings import ClassEmbedding, TimeEmbedding

# Blocks that may change the channel count (they start every unit).
CHANNEL_CHANGING = ("res", "conv")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Unit(nn.Module):
    """The ``blocks`` sequence applied once at one resolution: ``(B, C_in, H, W) -> (B, C_out, H, W)``.
    The first block maps ``C_in -> C_out``; the rest keep ``C_out``."""

    def __init__(self, names: Sequence[str], in_channels: int, out_channels: int, emb_dim: int, resolution: int, **block_kwargs):
        super().__init__()
        layers = []
        for i, name in enumerate(names):
            c_in = in_channels if i == 0 else out_channels
            cls = BLOCKS[name]
            layers.append(cls(c_in, out_channels, emb_dim, **options_for(cls, dict(resolution=resolution, **block_kwargs))))
        self.layers = nn.ModuleList(layers)

    def forward(self, x, emb, cls):
        for layer in self.layers:
            x = layer(x, emb, cls)
        return x


class UNet(nn.Module):
    """U-Net denoiser ``model(x_t, t, y)``: its output is what ``scheduler.prediction`` names (epsilon, x_0 or v).

    Args:
        image_size: input height = width (e.g. 28, 32, 64, 128); must be divisible by
            ``2 ** (len(channel_mult) - 1)`` unless ``pad_input``.
        in_channels: image channels C.
        out_channels: output channels (C, or 2C for learned variance); default ``in_channels``.
        base_channels: channels of the first level.
        channel_mult: per-level multipliers of ``base_channels``; one level per entry.
        blocks: ordered block names applied in every unit, e.g. ``[res, clsAtn, chnAtn]``; the
            first must be one of ``res``/``conv`` (it changes the channel count).
        num_blocks: units per level on the way down (``num_blocks + 1`` on the way up).
        num_classes: number of classes (0 = unconditional); index ``num_classes`` is the null class.
        dropout: dropout inside residual blocks.
        attention_resolutions: feature-map sizes where attention blocks (``atn``, ``clsAtn``) are
            kept, e.g. ``[32, 16, 8]``; ``None`` keeps them at every level. Sizes that no level has
            are ignored (so one preset builds at several image sizes), but at least one must occur.
        use_scale_shift_norm: the embedding scales and shifts the normalised features (ADM) or is added.
        resblock_updown: down/up-sample with residual blocks (ADM) instead of a strided conv /
            nearest-upsample conv.
        gradient_checkpointing: recompute each unit in backward to save memory (same gradients).
        channels_last: keep weights and activations in channels-last memory format.
        pad_input: zero-pad inputs whose size is not divisible by ``2 ** (len(channel_mult) - 1)``
            (e.g. 28 px MNIST with four levels) symmetrically up to the next multiple, and crop the
            output back; attention resolutions then refer to the padded sizes.
        compile: compile the forward in place with ``torch.compile`` (state-dict keys unchanged).
        compile_mode: ``torch.compile`` mode when ``compile``: ``default``, ``reduce-overhead`` (CUDA
            graphs), ``max-autotune`` or ``max-autotune-no-cudagraphs``.
        Other keyword arguments go to every block: ``window_size`` (atn/clsAtn window, null =
        global), ``num_heads`` or ``head_channels``, ``class_tokens`` (clsAtn), ``conv_expansion``
        (conv).

    ``forward(x: (B, C, H, W) float, t: (B,) int, y: (B,) int or None) -> (B, out_channels, H, W)``.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        blocks: Sequence[str] = ("res",),
        num_blocks: int = 1,
        num_classes: int = 0,
        dropout: float = 0.0,
        attention_resolutions: Sequence[int] | None = None,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        pad_input: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        **block_kwargs,
    ):
        super().__init__()
        self._check_options(block_kwargs)
        blocks = list(blocks)
        channel_mult = [int(m) for m in channel_mult]
        factor = 2 ** (len(channel_mult) - 1) if channel_mult else 1
        inner_size = -(-int(image_size) // factor) * factor if pad_input else int(image_size)
        self._validate(image_size, in_channels, base_channels, channel_mult, blocks, num_blocks, num_classes, dropout, pad_input)
        attn_res = self._attention_sizes(attention_resolutions, blocks, channel_mult, inner_size, image_size)
        self.image_size = image_size
        self.inner_size = inner_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = int(num_classes)
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = channels_last
        self.compile_requested = bool(compile)

        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, emb_dim)
        self.class_embed = ClassEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        kw = dict(dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, **block_kwargs)

        ch = self._build_stacks(blocks, attn_res, channel_mult, base_channels, num_blocks, inner_size, emb_dim, resblock_updown, kw)
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)))
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode: unknown mode {compile_mode!r}; choose from {', '.join(COMPILE_MODES)}")
        if compile:
            self.compile(mode=None if compile_mode == "default" else compile_mode)

    @staticmethod
    def _attention_sizes(attention_resolutions, blocks, channel_mult, inner_size, image_size):
        """The feature-map sizes that keep attention blocks (None = all); refuses sizes that match no level."""
        attn_res = None if attention_resolutions is None else {int(r) for r in attention_resolutions}
        level_res = [inner_size // 2**i for i in range(len(channel_mult))]
        if attn_res is not None and any(b in ("atn", "clsAtn") for b in blocks) and not attn_res & set(level_res):
            raise ValueError(
                f"model.attention_resolutions={sorted(attn_res)} matches no level of this U-Net (feature-map sizes "
                f"{level_res} for image size {image_size}): the attention blocks would never be used; choose among {level_res} or null"
            )
        return attn_res

    def _build_stacks(self, blocks, attn_res, channel_mult, base_channels, num_blocks, inner_size, emb_dim, resblock_updown, kw) -> int:
        """``conv_in``, the down, middle and up stacks (in this order, so initialisation and state-dict
        keys are unchanged); returns the channel count entering the output head."""

        def names_at(res: int):
            if attn_res is None or res in attn_res:
                return blocks
            return [b for b in blocks if b not in ("atn", "clsAtn")]

        def down_op(ch):
            return ResBlock(ch, ch, emb_dim, updown="down", **options_for(ResBlock, kw)) if resblock_updown else Downsample(ch)

        def up_op(ch):
            return ResBlock(ch, ch, emb_dim, updown="up", **options_for(ResBlock, kw)) if resblock_updown else Upsample(ch)

        ch = base_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(self.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [ch]
        res = inner_size
        for level, mult in enumerate(channel_mult):
            out_ch = base_channels * mult
            for _ in range(num_blocks):
                self.down.append(Unit(names_at(res), ch, out_ch, emb_dim, res, **kw))
                ch = out_ch
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(down_op(ch))
                res //= 2
                skip_channels.append(ch)
        self.mid = nn.ModuleList([Unit(names_at(res), ch, ch, emb_dim, res, **kw), ResBlock(ch, ch, emb_dim, **options_for(ResBlock, kw))])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = base_channels * mult
            for _ in range(num_blocks + 1):
                self.up.append(Unit(names_at(res), ch + skip_channels.pop(), out_ch, emb_dim, res, **kw))
                ch = out_ch
            if level > 0:
                self.up.append(up_op(ch))
                res *= 2
        return ch

    @classmethod
    def _check_options(cls, block_kwargs: dict) -> None:
        """Options beyond the U-Net's own must be options of some block (``model.chanels`` is refused)."""
        import inspect

        block_opts = all_block_options() - {"resolution", "updown", "dropout", "use_scale_shift_norm"}
        unknown = sorted(set(block_kwargs) - block_opts)
        if unknown:
            own = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "block_kwargs")]
            raise ValueError(
                f"model: unknown option(s) {', '.join(repr(k) for k in unknown)}; valid options: {', '.join(own)}, "
                f"and for the blocks: {', '.join(sorted(block_opts))}"
            )

    @staticmethod
    def _validate(image_size, in_channels, base_channels, channel_mult, blocks, num_blocks, num_classes, dropout, pad_input=False):
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
        if image_size < factor:
            raise ValueError(f"image size {image_size} is smaller than 2**(len(model.channel_mult) - 1) = {factor}: use fewer levels in model.channel_mult")
        if image_size % factor and not pad_input:
            raise ValueError(
                f"image size {image_size} is not divisible by 2**(len(model.channel_mult) - 1) = {factor}: "
                f"use fewer levels in model.channel_mult, set data.image_size to a multiple of {factor}, "
                f"or set model.pad_input=true"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet built for (B, {self.in_channels}, {self.image_size}, {self.image_size}) inputs, got {tuple(x.shape)}"
            )
        pad = self.inner_size - self.image_size
        if pad:
            x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
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
        out = self.out(h)
        if pad:
            out = out[..., pad // 2 : pad // 2 + self.image_size, pad // 2 : pad // 2 + self.image_size]
        return out

    def _run(self, layer: nn.Module, h, emb, cls):
        if isinstance(layer, (Downsample, Upsample)):
            return layer(h)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, emb, cls, use_reentrant=False)
        return layer(h, emb, cls)

