"""Timestep and class embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of timesteps ``t: (B,)`` (int or float, in [0, T)).

    Frequencies decrease geometrically from 1 to ``1 / max_period``:
    ``f_i = max_period ** (-i / (half - 1))`` for ``i = 0 .. half - 1``; output ``[cos(t f), sin(t f)]``,
    shape ``(B, dim)``, values in [-1, 1]. Odd ``dim`` is zero-padded.
    """
    half = dim // 2
    if half < 1:
        raise ValueError(f"timestep embedding dim must be >= 2, got {dim}")
    denom = max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / denom)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoid followed by an MLP: ``(B,) -> (B, emb_dim)``."""

    def __init__(self, base_dim: int, emb_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.base_dim))


class ClassEmbedding(nn.Module):
    """Learned class embedding ``(B,) int -> (B, emb_dim)`` with an extra *null* class (index
    ``num_classes``) for unconditional passes in classifier-free guidance. ``y=None`` means the null
    class. The null embedding is fixed at exactly zero (``padding_idx``: never updated), so a
    null-class pass sees the time embedding alone and class-dependent blocks reduce exactly to
    their unconditional form."""

    def __init__(self, num_classes: int, emb_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, emb_dim, padding_idx=num_classes)

    def forward(self, y: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch_size,), self.num_classes, device=device, dtype=torch.long)
        return self.embed(y)
