"""A shuffle that depends only on (seed, epoch), so an interrupted run resumes with the same order."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededRandomSampler(Sampler[int]):
    """Random permutation of ``range(n)`` drawn from ``torch.Generator().manual_seed(seed + epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch (as it does for ``DistributedSampler``,
    which it substitutes under DDP), so the data order is a pure function of the seed and the epoch:
    a run resumed at an epoch boundary sees exactly the batches an uninterrupted run sees.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
