"""Image files and uint8 image arrays: decoding, resize + center crop, and the dataset that reads them.

Shared by the butterflies and ImageNet-64 data modules.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .samplers import item_index

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_images(root: Union[str, os.PathLike]) -> list[Path]:
    """Every image file below ``root`` (searched recursively, hidden entries skipped), sorted by path."""
    root = Path(root)
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel) and p.is_file():
            found.append(p)
    return sorted(found)


def decode_image(source: Union[str, os.PathLike, bytes], name: Optional[str] = None):
    """Decode a PNG/JPEG/... file or its encoded bytes into an RGB ``PIL.Image``.

    Raises ``ValueError`` naming ``name`` (or the path) when the data cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    label = name or str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
        with fp, Image.open(fp) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {label}: {e} (corrupt or not an image; remove or replace it)") from e


ON_BAD_FILE = ("error", "skip")


def check_on_bad_file(value: str) -> str:
    if value not in ON_BAD_FILE:
        raise ValueError(f"data.on_bad_file={value!r}: choose from {', '.join(ON_BAD_FILE)}")
    return value


def decode_or_skip(source, on_bad_file: str, skipped: list, name: Optional[str] = None):
    """:func:`decode_image`, or ``None`` with one warning when ``on_bad_file='skip'`` and the file cannot
    be decoded (its name is appended to ``skipped``). With ``'error'`` the ``ValueError`` names the file."""
    try:
        return decode_image(source, name=name)
    except ValueError as e:
        if on_bad_file != "skip":
            raise ValueError(f"{e}; or set data.on_bad_file=skip to train without it") from None
        label = name or str(source)
        logging.getLogger("ddlab.data").warning("skipping %s (data.on_bad_file=skip): %s", label, e)
        skipped.append(label)
        return None


def resize_center_crop(img, size: int) -> np.ndarray:
    """Resize an RGB ``PIL.Image`` so its shorter side is ``size`` (bicubic, antialiased), then crop
    the central ``size x size`` square. Returns ``(3, size, size) uint8``.

    An image whose shorter side already equals ``size`` is only cropped (no resampling).
    """
    from PIL import Image

    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        w, h = nw, nh
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]`` (``x / 127.5 - 1``, the same map as MNIST)."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


class ArrayImageDataset(Dataset):
    """Images read one at a time from a uint8 array: ``images (N, C, H, W) uint8`` (an in-memory
    array or tensor, or a read-only ``np.memmap`` — nothing is loaded until an item is asked for)
    and ``labels (N,) int``.

    Item ``i`` is ``(x: (C, H, W) float32 in [-1, 1], y: int)``. Keys may be ``(i, coin)`` pairs from
    :class:`~ddlab.data.samplers.EpochSeededRandomSampler`; with ``hflip`` an item is mirrored
    left-right when its coin is 1 (a seeded draw per image and epoch, so resumes and worker counts
    do not change which images are flipped). Plain integer keys are never flipped.
    """

    def __init__(self, images, labels: Sequence[int], hflip: bool = False, name: str = "data set"):
        if len(images) == 0:
            raise ValueError(f"{name}: the data set is empty (check data.limit and the data files)")
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        if getattr(images, "ndim", 0) != 4:
            raise ValueError(f"{name}: expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        self.images = images
        self.labels = labels
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.images)

    # a memmap is sent to spawned worker processes as its file and shape, never as its bytes
    # (``images`` may be a prefix ``memmap[:n]``, which starts at the same offset as the map)
    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self.images, np.memmap) and self.images.filename is not None:
            state["images"] = ("__memmap__", self.images.filename, self.images.offset, self.images.shape, self.images.dtype.str)
        return state

    def __setstate__(self, state):
        images = state["images"]
        if isinstance(images, tuple) and images and images[0] == "__memmap__":
            _, filename, offset, shape, dtype = images
            state["images"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

    def __getitem__(self, key):
        i, coin = item_index(key)
        x = self.images[i]
        x = x.clone() if torch.is_tensor(x) else torch.from_numpy(np.array(x, dtype=np.uint8))
        x = uint8_to_float(x)
        if self.hflip and coin:
            x = x.flip(-1)
        return x, int(self.labels[i])
