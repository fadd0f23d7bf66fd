"""Drawing evaluation samples in batches (plain torch; used by ``ddlab.fid`` and the FID callback)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def balanced_labels(n: int, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """``(n,)`` int64 labels with every class ``n // K`` or ``n // K + 1`` times, in random order;
    ``None`` for unconditional models (``num_classes == 0``)."""
    if num_classes <= 0:
        return None
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]


@torch.no_grad()
def generate_uint8(model: nn.Module, diffusion, sampler, n: int, batch_size: int, labels: torch.Tensor | None = None,
                   guidance_scale: float | None = None, seed: int = 0, progress: bool = True,
                   desc: str = "sampling") -> np.ndarray:
    """``n`` samples of ``model`` as ``(n, H, W, C)`` uint8, drawn in batches of ``batch_size`` with
    ``sampler`` (a configured sampler, :mod:`ddlab.diffusion.samplers`); batch ``i`` uses noise from ``seed + i``.
    ``labels``: ``(n,)`` or ``None``; ``guidance_scale`` ``None`` keeps the sampler's (forced to 1 for
    unconditional models)."""
    from tqdm.auto import tqdm

    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    device = next(model.parameters()).device
    w = sampler.guidance_scale if guidance_scale is None else float(guidance_scale)
    if labels is None:
        w = 1.0
    shape = (model.in_channels, model.image_size, model.image_size)
    out = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for i, start in enumerate(range(0, n, batch_size)):
            b = min(batch_size, n - start)
            g = torch.Generator(device=device).manual_seed(int(seed) + i)
            y = labels[start:start + b].to(device) if labels is not None else None
            x = sampler.sample(model, diffusion, (b, *shape), y=y, generator=g, guidance_scale=w)
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
            bar.update(b)
    return np.concatenate(out)
