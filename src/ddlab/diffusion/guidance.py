"""Classifier-free guidance around a network ``model(x, t, y)``, shared by every sampler."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

GUIDANCE_BATCHING = ("auto", "joint", "split")


def resolve_guidance_batching(batching: str, device: torch.device | str) -> str:
    """``auto`` is ``joint`` on accelerators and ``split`` on CPU.

    Measured on a 2-core CPU (``make bench``, batch 64, small U-Net): guidance cost 2.17-2.45x the
    unguided time with one forward of 2B and 1.81-1.97x with two of B. On a GPU one forward of 2B
    fills the device better than two of B."""
    if batching not in GUIDANCE_BATCHING:
        raise ValueError(f"sampler.guidance_batching: unknown value {batching!r}; choose from {', '.join(GUIDANCE_BATCHING)}")
    if batching == "auto":
        return "split" if torch.device(device).type == "cpu" else "joint"
    return batching


def guided_model_fn(model: nn.Module, guidance_scale: float = 1.0, channels: Optional[int] = None, batching: str = "joint"):
    """Wrap a network ``model(x, t, y)`` as a model function with classifier-free guidance.

    With labels ``y`` and ``guidance_scale = w != 1`` the conditional and unconditional outputs are
    combined as ``out_u + w (out_c - out_u)`` (Ho & Salimans 2022). ``batching="joint"`` runs both
    passes as one forward of twice the batch; ``"split"`` runs two forwards (same result; faster on
    CPU, see :func:`resolve_guidance_batching`). The combination is linear, so it is valid for eps,
    x0 and v predictions; for learned variance only the first ``channels`` channels are guided and
    the conditional variance is kept. ``y=None`` (or the null class, ``model.num_classes``) samples
    unconditionally.
    """
    num_classes = int(getattr(model, "num_classes", 0))
    if batching not in ("joint", "split"):
        raise ValueError(f"guided_model_fn: batching must be 'joint' or 'split', got {batching!r}")

    def fn(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        if y is None or guidance_scale == 1.0:
            return model(x, t, y)
        null = torch.full_like(y, num_classes)
        if batching == "split":
            cond, uncond = model(x, t, y), model(x, t, null)
        else:
            cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        c = channels if channels is not None else x.shape[1]
        guided = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1) if cond.shape[1] > c else guided

    return fn


def check_guidance_interval(interval) -> Optional[tuple[float, float]]:
    """``sampler.guidance_interval``: null (guide at every noise level) or ``[sigma_lo, sigma_hi]``,
    returned as a pair of floats with ``0 <= sigma_lo < sigma_hi``."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"sampler.guidance_interval must be null or [sigma_lo, sigma_hi], got {interval!r}") from None
    if not 0.0 <= lo < hi:
        raise ValueError(f"sampler.guidance_interval=[{lo}, {hi}]: needs 0 <= sigma_lo < sigma_hi (noise levels sigma, "
                         "as in EDM: sigma = sqrt((1 - alpha_bar) / alpha_bar) for VP models)")
    return lo, hi


def guides_at(sigma: float, interval: Optional[tuple[float, float]]) -> bool:
    """Whether guidance applies at noise level ``sigma``: always without an interval, else for
    ``sigma_lo < sigma <= sigma_hi`` (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval")."""
    return interval is None or interval[0] < float(sigma) <= interval[1]


def check_guidance(model: nn.Module, y: Optional[torch.Tensor], guidance_scale: float) -> None:
    """Fail early when labels or guidance are asked of a model trained without labels."""
    num_classes = int(getattr(model, "num_classes", 0))
    if num_classes == 0 and (y is not None or guidance_scale != 1.0):
        raise ValueError(
            "this model was trained without labels (model.num_classes=0): classifier-free guidance "
            f"(guidance_scale={guidance_scale}) and labels are not available; sample with guidance_scale=1 and no labels"
        )
    if y is not None and num_classes > 0 and ((y < 0) | (y > num_classes)).any():
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (or {num_classes} for the null class)")
