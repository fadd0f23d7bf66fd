"""A training order that is a pure function of (seed, epoch) and can resume from any batch.

* :class:`EpochSeededRandomSampler` — the permutation of ``range(n)`` drawn from a generator seeded
  with ``seed + epoch`` (the formula of torch's ``DistributedSampler``), split across ranks the way
  ``DistributedSampler`` splits it (it is one, so Lightning keeps it under DDP instead of inserting
  its own). With every index it yields a coin ``flip`` drawn from the same generator, so random
  horizontal flips do not depend on worker processes or on the global RNG.
* :class:`ResumableDataLoader` — a ``DataLoader`` with ``state_dict`` / ``load_state_dict``
  (Lightning stores them in the checkpoint's fit-loop state): the epoch and the number of batches
  already handed to the training loop. A loader restored from that state skips those batches of
  the same permutation, so a run resumed from a mid-epoch checkpoint sees exactly the batches an
  uninterrupted run sees, with any ``num_workers`` (the count is of batches returned, never of
  indices prefetched by workers).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochSeededRandomSampler(DistributedSampler):
    """Yields ``(index, flip)`` pairs: rank ``rank``'s share of the epoch's seeded permutation, and a
    coin per image (0/1) for augmentations. ``start`` (set by :class:`ResumableDataLoader`) skips the
    first ``start`` items of this rank's share. ``drop_last`` drops the tail that does not split
    evenly across ranks, else the share is padded by repeating the start (as ``DistributedSampler``)."""

    def __init__(self, n: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, drop_last: bool = False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.n = int(n)
        self.num_replicas, self.rank, self.shuffle, self.drop_last = int(num_replicas), int(rank), shuffle, drop_last
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0
        if drop_last and self.n % self.num_replicas:
            self.num_samples = self.n // self.num_replicas
        else:
            self.num_samples = math.ceil(self.n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def order(self) -> tuple[list[int], list[int]]:
        """This rank's full share for the current epoch: ``(indices, flips)``."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        coins = torch.randint(0, 2, (self.n,), generator=g)
        idx = perm.tolist()
        if self.total_size > len(idx):  # pad by repeating the start
            idx += (idx * math.ceil(self.total_size / len(idx)))[: self.total_size - len(idx)]
        idx = idx[: self.total_size][self.rank : self.total_size : self.num_replicas]
        return idx, [int(coins[i]) for i in idx]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx, flips = self.order()
        return iter(list(zip(idx, flips))[self.start :])


def item_index(key: Any) -> tuple[int, int]:
    """``(index, flip coin)`` of a data set key: an ``int`` (coin 0) or an ``(index, coin)`` pair
    from :class:`EpochSeededRandomSampler`."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


class ResumableDataLoader(DataLoader):
    """The training loader: resumable at any batch (see the module docstring).

    Needs an :class:`EpochSeededRandomSampler` as ``sampler``. Lightning calls ``set_epoch`` on the
    sampler before each epoch's first batch; iteration starts lazily, at the first batch, so the
    epoch is set before any index is drawn, also when workers prefetch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Lightning may rebuild the loader with its own sampler (trainer.overfit_batches): then it is a
        # plain DataLoader and its state is empty
        self._resumable = isinstance(self.sampler, EpochSeededRandomSampler)
        self._position = 0   # batches of the current epoch handed out
        self._restore: Optional[dict] = None

    def __iter__(self) -> Iterator[Any]:
        if not self._resumable:
            return DataLoader.__iter__(self)
        sampler: EpochSeededRandomSampler = self.sampler
        skip = 0
        if self._restore is not None:
            if int(self._restore["epoch"]) == sampler.epoch:  # else Lightning already moved to the next epoch
                skip = int(self._restore["batches"])
            self._restore = None
        sampler.start = skip * int(self.batch_size)
        self._position = skip
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # a generator: nothing is drawn until the first batch is asked for
        for batch in DataLoader.__iter__(self):
            self._position += 1
            yield batch

    def state_dict(self) -> dict:
        if not self._resumable:
            return {}
        sampler: EpochSeededRandomSampler = self.sampler
        epoch, position = sampler.epoch, self._position
        if position >= len(self):  # the epoch is complete: the next batch is the next epoch's first
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "batches": position, "seed": sampler.seed, "batch_size": int(self.batch_size),
                "num_replicas": sampler.num_replicas, "n": sampler.n}

    def load_state_dict(self, state: dict) -> None:
        if not self._resumable or not state:
            return
        sampler: EpochSeededRandomSampler = self.sampler
        if int(state.get("batches", 0)) == 0:  # at an epoch boundary: nothing to skip, any batch size will do
            sampler.set_epoch(int(state["epoch"]))
            return
        for key, now in (("seed", sampler.seed), ("batch_size", int(self.batch_size)), ("num_replicas", sampler.num_replicas), ("n", sampler.n)):
            if key in state and int(state[key]) != now:
                raise ValueError(
                    f"cannot resume the data order exactly: the checkpoint's training loader had {key}={state[key]}, "
                    f"this run has {now} (data.batch_size, data.limit, seed and the number of devices must match "
                    "to resume mid-epoch; resume from an epoch-end checkpoint or keep them unchanged)"
                )
        sampler.set_epoch(int(state["epoch"]))
        self._restore = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
