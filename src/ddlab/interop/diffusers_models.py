"""diffusers' ``UNet2DModel`` as a ddlab network (``model=diffusers_unet2d``).

The wrapper owns a ``UNet2DModel`` (attribute ``unet``, so ``model.unet.save_pretrained(...)`` gives
a standard diffusers folder) and exposes what ddlab's training, sampling and evaluation read from a
network: ``forward(x, t, y) -> tensor`` and the attributes ``image_size``, ``in_channels``,
``out_channels`` and ``num_classes``. Class labels use diffusers' own class embedding
(``num_class_embeds = num_classes + 1``): index ``num_classes`` is ddlab's null class for
classifier-free guidance, and ``y=None`` on a conditional model means the null class.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# set by the wrapper from ddlab's own keys (image_size, in_channels, out_channels, num_classes)
_RESERVED = {"sample_size": "image_size", "in_channels": "in_channels", "out_channels": "out_channels",
             "num_class_embeds": "num_classes", "class_embed_type": "num_classes"}


def require_diffusers():
    """Import diffusers, or explain how to install it."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "model=diffusers_unet2d needs the diffusers package: pip install 'ddlab[interop]' (or pip install diffusers)"
        ) from e
    return diffusers


def unet2d_options() -> list[str]:
    """The keyword arguments of ``diffusers.UNet2DModel`` the wrapper passes through."""
    params = inspect.signature(require_diffusers().UNet2DModel.__init__).parameters
    return sorted(k for k in params if k != "self" and k not in _RESERVED)


class DiffusersUNet2D(nn.Module):
    """``diffusers.UNet2DModel`` with ddlab's interface.

    Args:
        image_size: side of the square images (diffusers' ``sample_size``); must be divisible by
            ``2 ** (len(block_out_channels) - 1)``.
        in_channels: image channels.
        out_channels: network output channels (default ``in_channels``; ``2 * in_channels`` for
            learned variances).
        num_classes: number of class labels (0: unconditional); the class embedding gets one more
            row for the null class.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        **unet_kwargs: any other ``UNet2DModel`` argument (``block_out_channels``,
            ``layers_per_block``, ``down_block_types``, ``up_block_types``, ``norm_num_groups``,
            ``attention_head_dim``, ``dropout``, ...), passed through unchanged.

    ``forward(x: (B, C, H, W) float, t: (B,) int, y: (B,) int or None) -> (B, out_channels, H, W)``.
    """

    def __init__(self, image_size: int, in_channels: int = 3, out_channels: int | None = None, num_classes: int = 0,
                 gradient_checkpointing: bool = False, **unet_kwargs: Any):
        super().__init__()
        diffusers = require_diffusers()
        valid = unet2d_options()
        for key in unet_kwargs:
            if key in _RESERVED:
                raise ValueError(f"model.{key}: set by ddlab from model.{_RESERVED[key]}; remove model.{key}")
            if key not in valid:
                raise ValueError(f"model.{key}: not an option of diffusers.UNet2DModel; choose from {', '.join(valid)}")
        self.image_size, self.in_channels = int(image_size), int(in_channels)
        self.out_channels = int(out_channels or in_channels)
        self.num_classes = int(num_classes)
        levels = len(unet_kwargs.get("block_out_channels", inspect.signature(diffusers.UNet2DModel.__init__).parameters["block_out_channels"].default))
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by 2**(len(model.block_out_channels) - 1) = {2 ** (levels - 1)}: "
                "use fewer blocks or another data.image_size"
            )
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0, got {self.num_classes}")
        # Hydra hands over ListConfig; diffusers stores its arguments in a JSON config
        unet_kwargs = {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in unet_kwargs.items()}
        self.unet = diffusers.UNet2DModel(
            sample_size=self.image_size, in_channels=self.in_channels, out_channels=self.out_channels,
            num_class_embeds=self.num_classes + 1 if self.num_classes else None, **unet_kwargs,
        )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"DiffusersUNet2D built for (B, {self.in_channels}, {self.image_size}, {self.image_size}) inputs, got {tuple(x.shape)}"
            )
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("labels were given to an unconditional model (model.num_classes=0)")
            labels = None
        else:
            labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long) if y is None else y.long()
        return self.unet(x, t, class_labels=labels, return_dict=False)[0]
