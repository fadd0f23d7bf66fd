"""Shared DataModule behaviour: loaders, limits, splits."""

from __future__ import annotations

import os
from typing import Callable, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .samplers import EpochSeededRandomSampler, ResumableDataLoader, item_index


class TensorImageDataset(Dataset):
    """``(images: (N, C, H, W) float in [-1, 1], labels: (N,) int64)`` with an optional per-item transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        if len(images) == 0:
            raise ValueError("the data set is empty (check data.limit and the data files)")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        i, _ = item_index(key)
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


class ImageDataModule(pl.LightningDataModule):
    """Base class. Subclasses implement ``build_split(split) -> Dataset`` for ``train`` and ``val``
    (the val split is un-augmented and doubles as the reference set for FID statistics).

    Exposes ``image_size``, ``channels`` and ``num_classes`` for the model config.
    ``batch_size`` is per device: the global batch is ``batch_size * devices * num_nodes *
    accumulate_grad_batches``. The training loader is a :class:`ResumableDataLoader` over an
    :class:`EpochSeededRandomSampler` (also under DDP): its position travels in the checkpoint.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        num_classes: int,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        limit: Optional[int] = None,
        val_limit: Optional[int] = None,
        drop_last: bool = True,
        on_bad_file: str = "error",
    ):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
        if limit is not None and int(limit) < 1:
            raise ValueError(f"data.limit must be a positive integer or null, got {limit}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.limit = limit
        self.val_limit = val_limit
        self.drop_last = drop_last
        from .images import check_on_bad_file

        self.on_bad_file = check_on_bad_file(on_bad_file)
        self.skipped_files: list[str] = []  # image files that could not be decoded (on_bad_file=skip)
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self._split = "train"

    # subclasses -----------------------------------------------------------
    def build_split(self, split: str) -> Dataset:
        raise NotImplementedError

    def apply_limit(self, *arrays, split: Optional[str] = None):
        """First ``data.limit`` (train) or ``data.val_limit`` (val) items of each array."""
        limit = self.limit if (split or self._split) == "train" else (self.val_limit or self.limit)
        if limit is None:
            return arrays
        return tuple(a[: int(limit)] for a in arrays)

    # Lightning ------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self._split = "train"
            self.train_set = self.build_split("train")
        if self.val_set is None:
            self._split = "val"
            self.val_set = self.build_split("val")
            self._split = "train"

    def _loader(self, ds: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        kwargs = dict(batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                      persistent_workers=self.persistent_workers, drop_last=drop_last and len(ds) >= self.batch_size)
        if not shuffle:  # evaluation: Lightning inserts its DistributedSampler under DDP
            return DataLoader(ds, shuffle=False, **kwargs)
        # the training order is f(seed, epoch), split across ranks, and resumable at any batch; the
        # loader's own generator (worker seeds) keeps data loading off the global RNG
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = EpochSeededRandomSampler(len(ds), seed=seed, num_replicas=world, rank=rank, drop_last=kwargs["drop_last"])
        return ResumableDataLoader(ds, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kwargs)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def reference_dataset(self) -> Dataset:
        """The fixed, un-augmented split that FID reference statistics are computed from."""
        if self.val_set is None:
            self.setup("validate")
        return self.val_set


def to_numpy_uint8(x: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, C)`` uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
