"""Downsampled ImageNet 64x64 (Chrabaszcz, Loshchilov & Hutter 2017), read from a memory-mapped cache.

Sources, in ``data.path`` (searched recursively):

* ``pickle``: ``train_data_batch_1`` ... ``train_data_batch_10`` and ``val_data``, pickled dicts with
  ``data`` ``(N, 3*R*R) uint8`` channel-planar (R plane, G plane, B plane, each R x R row-major) and
  ``labels`` 1-based ints (as downloaded from image-net.org);
* ``npz``: the same files as ``.npz`` archives with the same arrays;
* ``folder``: ``train/<class>/*`` and ``val/<class>/*`` image files (classes = sorted train folder names).

The first use converts the source once into ``cache_dir``: ``{split}_images.u8`` (raw ``(N, 3, R, R)``
uint8, opened as a read-only ``np.memmap``), ``{split}_labels.npy`` (0-based int64) and ``meta.json``
(shapes, class count and a fingerprint of the source files). Every file is written to a temporary name,
fsynced and renamed, and ``meta.json`` is written last, so an interrupted conversion is redone, never
half-read. Later opens check the fingerprint and map the files without reading them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .base import ImageDataModule
from .images import ArrayImageDataset
from .prepare import (  # noqa: F401  (re-exported: the conversion lives in ddlab.data.prepare)
    HOW_TO_GET,
    SOURCES,
    SPLITS,
    default_cache_dir,
    find_array_files,
    prepare_imagenet64,
    read_array_file,
    read_meta,
    resolution_of,
    source_fingerprint,
)

log = logging.getLogger(__name__)


def open_split(cache_dir: Union[str, os.PathLike], split: str, meta: Optional[dict] = None) -> tuple[np.memmap, np.ndarray]:
    """Map a converted split without reading it: ``images (N, 3, R, R) uint8`` (read-only
    ``np.memmap``) and ``labels (N,) int64`` 0-based (``np.load(..., mmap_mode='r')``)."""
    cache_dir = Path(cache_dir)
    meta = meta or read_meta(cache_dir)
    if meta is None:
        raise FileNotFoundError(f"{cache_dir / 'meta.json'}: no converted ImageNet-64 cache; run python -m ddlab.data.prepare imagenet64 src=... dst={cache_dir}")
    n, r = meta["splits"][split]["n"], meta["resolution"]
    path = cache_dir / f"{split}_images.u8"
    if not path.is_file() or path.stat().st_size != n * 3 * r * r:
        raise ValueError(f"{path}: expected {n * 3 * r * r} bytes for {n} images of 3x{r}x{r}; delete {cache_dir} to convert again")
    images = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 3, r, r))
    labels = np.load(cache_dir / f"{split}_labels.npy", mmap_mode="r")
    if labels.shape != (n,):
        raise ValueError(f"{cache_dir / f'{split}_labels.npy'}: {labels.shape} labels for {n} images; delete {cache_dir} to convert again")
    return images, labels


# ---------------------------------------------------------------------------------------------
class ImageNet64DataModule(ImageDataModule):
    """Class-conditional downsampled ImageNet, ``(3, R, R)`` images in [-1, 1] and 0-based labels.

    Train = the ``train_data_batch_*`` files (random horizontal flip when ``hflip``), val = reference set
    for FID = ``val_data`` (never flipped). Images are read one at a time from the memory-mapped cache,
    so workers share the page cache instead of holding copies. ``num_classes`` is the count the model is
    built for: it must equal the number of classes in the files (1000 for ImageNet, 200 for the
    stand-in), or be 0 to train unconditionally.
    """

    def __init__(
        self,
        path: str = "data/imagenet64",
        source: str = "auto",
        cache_dir: Optional[str] = None,
        image_size: int = 64,
        channels: int = 3,
        num_classes: int = 1000,
        hflip: bool = True,
        **kwargs,
    ):
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r}: choose from {', '.join(SOURCES)}")
        if channels != 3:
            raise ValueError(f"data.channels must be 3 for ImageNet (RGB), got {channels}")
        if int(num_classes) < 0:
            raise ValueError(f"data.num_classes must be >= 0, got {num_classes}")
        super().__init__(image_size=image_size, channels=3, num_classes=num_classes, **kwargs)
        self.path = Path(path)
        self.source = source
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.hflip = hflip
        self.meta: Optional[dict] = None

    def prepare(self) -> dict:
        """Convert (first time) or validate the cache; check resolution and class count. Returns ``meta``."""
        if self.meta is None:
            cache_dir = self.cache_dir or default_cache_dir(self.path)
            meta = prepare_imagenet64(self.path, cache_dir, self.source, self.image_size, on_bad_file=self.on_bad_file)
            self.skipped_files = list(meta.get("skipped_files", []))
            if self.skipped_files:
                log.warning("ImageNet-64: %d source file(s) could not be decoded and were left out (data.on_bad_file=skip)", len(self.skipped_files))
            if meta["resolution"] != self.image_size:
                raise ValueError(
                    f"data.image_size={self.image_size} but {self.path} holds {meta['resolution']}x{meta['resolution']} images; "
                    f"set data.image_size={meta['resolution']}"
                )
            k = meta["num_classes"]
            if self.num_classes not in (0, k):
                raise ValueError(
                    f"data.num_classes={self.num_classes} but {self.path} holds {k} classes: set data.num_classes={k} "
                    "(the model follows through ${data.num_classes}), or 0 for an unconditional model"
                )
            if meta["splits"]["val"]["max_label"] >= k:
                raise ValueError(f"{self.path}: a validation label ({meta['splits']['val']['max_label'] + 1}, 1-based) exceeds the {k} training classes")
            self.cache_dir, self.meta = Path(cache_dir), meta
        return self.meta

    def prepare_data(self) -> None:
        self.prepare()

    def build_split(self, split: str):
        meta = self.prepare()
        images, labels = open_split(self.cache_dir, split, meta)
        images, labels = self.apply_limit(images, labels, split=split)
        if not self.num_classes:
            labels = np.zeros(len(labels), dtype=np.int64)
        return ArrayImageDataset(images, labels, hflip=self.hflip and split == "train", name=f"imagenet64 {split} ({self.cache_dir})")
