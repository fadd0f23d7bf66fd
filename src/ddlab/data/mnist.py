"""MNIST from the official IDX files."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .base import ImageDataModule, TensorImageDataset

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = [f for pair in FILES.values() for f in pair]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array; errors name the file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e} (truncated or not gzip?); delete it and download again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header promises {expected} bytes of data for shape {shape}, found {len(data) - header} (truncated or corrupt file)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_mnist_dir(data_dir: str | os.PathLike) -> Optional[Path]:
    """The first of ``data_dir``, ``data_dir/MNIST/raw``, ``data_dir/raw``, ``data_dir/mnist`` holding all
    four IDX files (raw or ``.gz``)."""
    root = Path(data_dir)
    for d in (root, root / "MNIST" / "raw", root / "raw", root / "mnist", root / "mnist" / "raw"):
        if all(_locate(d, f) is not None for f in ALL_FILES):
            return d
    return None


def _locate(d: Path, name: str) -> Optional[Path]:
    for cand in (d / name, d / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def load_mnist(data_dir: str | os.PathLike, split: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28) uint8`` and labels ``(N,) int64`` for ``split`` in ``train``/``test``."""
    if split not in FILES:
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    d = find_mnist_dir(data_dir)
    if d is None and download:
        root = Path(data_dir)
        missing = [p for p in (root, *root.parents) if not p.exists()]  # the download creates these
        created = missing[-1] if missing else (None if (root / "MNIST").exists() else root / "MNIST")
        try:
            from torchvision.datasets import MNIST

            MNIST(str(data_dir), train=True, download=True)
            MNIST(str(data_dir), train=False, download=True)
        except Exception as e:  # network errors vary by platform
            if created is not None:  # leave no empty or half-filled folders behind
                shutil.rmtree(created, ignore_errors=True)
            raise FileNotFoundError(_missing_message(data_dir, f"download failed: {e}")) from e
        d = find_mnist_dir(data_dir)
    if d is None:
        raise FileNotFoundError(_missing_message(data_dir, "data.download=false" if not download else "not found after download"))
    img_name, lbl_name = FILES[split]
    images = read_idx(_locate(d, img_name))
    labels = read_idx(_locate(d, lbl_name)).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{_locate(d, img_name)}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{_locate(d, lbl_name)}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.max() > 9:
        raise ValueError(f"{_locate(d, lbl_name)}: label {labels.max()} outside 0-9")
    return images, labels


def _missing_message(data_dir, why: str) -> str:
    return (
        f"MNIST not found in {Path(data_dir).resolve()} (also looked in MNIST/raw, raw, mnist below it; {why}). "
        f"Expected the four official IDX files, raw or .gz: {', '.join(ALL_FILES)}. "
        "Set paths.data_dir=... or the DDLAB_DATA_DIR environment variable to the folder holding them, "
        "or allow data.download=true on a machine with internet access."
    )


def mnist_to_tensor(images: np.ndarray, image_size: int, resize: str = "pad") -> torch.Tensor:
    """``(N, 28, 28) uint8 -> (N, 1, S, S) float32`` in [-1, 1]: zero-pad (black border) or bilinear resize."""
    x = torch.from_numpy(np.array(images, copy=True)).float().div_(127.5).sub_(1.0)[:, None]
    if image_size == 28:
        return x
    if resize == "pad":
        if image_size < 28 or (image_size - 28) % 2:
            raise ValueError(f"data.image_size={image_size}: padding needs an even size >= 28; use data.resize=resize")
        p = (image_size - 28) // 2
        return F.pad(x, (p, p, p, p), value=-1.0)
    if resize == "resize":
        return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True).clamp_(-1, 1)
    raise ValueError(f"data.resize must be 'pad' or 'resize', got {resize!r}")


class MNISTDataModule(ImageDataModule):
    """MNIST digits, 1 channel, 10 classes; 28x28 padded (default) or resized to ``image_size``.

    Train split = the official 60k training digits; val/reference split = the 10k test digits
    (never augmented). The whole split lives in memory as a float tensor (245 MB for 60k at 32 px).
    """

    def __init__(
        self,
        data_dir: str = "data",
        image_size: int = 32,
        resize: str = "pad",
        download: bool = True,
        channels: int = 1,
        num_classes: int = 10,
        **kwargs,
    ):
        if channels != 1:
            raise ValueError(f"data.channels must be 1 for MNIST, got {channels}")
        if num_classes not in (0, 10):
            raise ValueError(f"data.num_classes must be 10 (or 0 to drop labels) for MNIST, got {num_classes}")
        super().__init__(image_size=image_size, channels=1, num_classes=num_classes, **kwargs)
        self.data_dir = data_dir
        self.resize = resize
        self.download = download

    def prepare_data(self) -> None:
        if find_mnist_dir(self.data_dir) is None:
            load_mnist(self.data_dir, "train", download=self.download)

    def build_split(self, split: str):
        images, labels = load_mnist(self.data_dir, "train" if split == "train" else "test", download=False)
        images, labels = self.apply_limit(images, labels, split=split)
        x = mnist_to_tensor(images, self.image_size, self.resize)
        y = torch.from_numpy(labels) if self.num_classes else torch.zeros(len(labels), dtype=torch.long)
        return TensorImageDataset(x, y)
