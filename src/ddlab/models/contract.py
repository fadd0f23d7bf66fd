"""The contract every ddlab network keeps, checked once when a model is built."""

from __future__ import annotations

import torch
from torch import nn


def check_model_contract(model: nn.Module, image_size: int, channels: int, out_channels: int) -> None:
    """Run one forward pass on a single ``(1, channels, image_size, image_size)`` image and refuse a
    model that breaks ddlab's contract, naming its class and what was expected:

    * ``model(x, t, y)`` returns a tensor (not an output object) of shape
      ``(1, out_channels, image_size, image_size)``;
    * attributes ``image_size`` and ``in_channels`` (sampling reads the image shape from them) that
      match the data.

    ``y`` is class 0 when ``model.num_classes > 0``, else ``None``. The model's training mode and
    parameters are left as they were.
    """
    name = type(model).__name__
    try:
        p = next(model.parameters())
        device, dtype = p.device, p.dtype if p.is_floating_point() else torch.float32
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    x = torch.zeros(1, channels, image_size, image_size, device=device, dtype=dtype)
    t = torch.zeros(1, dtype=torch.long, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if int(getattr(model, "num_classes", 0) or 0) > 0 else None
    expected = (1, out_channels, image_size, image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x, t, y)
    finally:
        model.train(was_training)
    if not torch.is_tensor(out):
        hint = " (a diffusers model: use model=diffusers_unet2d, which returns the `.sample` tensor)" if hasattr(out, "sample") else ""
        raise TypeError(f"model {name}: forward(x, t, y) returned a {type(out).__name__}, expected a tensor of shape {expected}{hint}")
    if tuple(out.shape) != expected:
        raise ValueError(
            f"model {name}: forward(x, t, y) on a {tuple(x.shape)} batch returned shape {tuple(out.shape)}, expected {expected} "
            f"({out_channels} output channels for {channels} image channels; learned variances need 2x)"
        )
    for attr, want in (("image_size", image_size), ("in_channels", channels)):
        have = getattr(model, attr, None)
        if have is None:
            raise TypeError(f"model {name} has no attribute `{attr}`: ddlab's sampling reads the image shape from "
                            f"model.image_size and model.in_channels; set them in {name}.__init__ (expected {attr}={want})")
        if int(have) != int(want):
            raise ValueError(f"model {name} has {attr}={have} but the data needs {want}")
