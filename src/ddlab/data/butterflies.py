"""The Smithsonian butterflies subset (``huggan/smithsonian_butterflies_subset``): 1000 RGB photos,
unconditional. Read from the Hugging Face hub, a local parquet copy, or a folder of images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .base import ImageDataModule
from .images import IMAGE_EXTENSIONS, ArrayImageDataset, decode_or_skip, find_images, resize_center_crop

log = logging.getLogger(__name__)

SOURCES = ("auto", "hub", "parquet", "folder")
HUB_NAME = "huggan/smithsonian_butterflies_subset"


def find_parquet(path: Path) -> list[Path]:
    """``path`` itself if it is a ``.parquet`` file, else every ``*.parquet`` below it, sorted."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    return sorted(p for p in path.rglob("*.parquet") if p.is_file()) if path.is_dir() else []


def read_parquet_images(files: list[Path], image_size: int, limit: Optional[int] = None, on_bad_file: str = "error",
                        skipped: Optional[list] = None) -> np.ndarray:
    """Decode the ``image`` column (dicts with encoded PNG/JPEG ``bytes``, as the Hugging Face
    ``datasets`` library writes it) of each parquet file. Returns ``(N, 3, S, S) uint8``."""
    import pyarrow.parquet as pq

    out = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for corrupt files
            raise ValueError(f"cannot read parquet file {f}: {e} (corrupt or truncated; obtain it again)") from e
        if "image" not in pf.schema_arrow.names:
            raise ValueError(f"{f}: no `image` column (columns: {pf.schema_arrow.names}); expected the Hugging Face image layout")
        try:
            column = pf.read(columns=["image"]).column("image").to_pylist()
        except Exception as e:
            raise ValueError(f"cannot read parquet file {f}: {e} (corrupt or truncated; obtain it again)") from e
        for row, cell in enumerate(column):
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise ValueError(f"{f}: row {row} of the `image` column holds no encoded image bytes")
            img = decode_or_skip(bytes(data), on_bad_file, skipped if skipped is not None else [], name=f"{f} (row {row})")
            if img is None:
                continue
            out.append(resize_center_crop(img, image_size))
            if limit is not None and len(out) >= limit:
                return np.stack(out)
    return np.stack(out) if out else np.zeros((0, 3, image_size, image_size), np.uint8)


def read_folder_images(files: list[Path], image_size: int, on_bad_file: str = "error", skipped: Optional[list] = None) -> np.ndarray:
    """Decode, resize and center-crop image files. Returns ``(N, 3, S, S) uint8``; files that cannot
    be decoded raise (``on_bad_file='error'``) or are left out and listed in ``skipped`` (``'skip'``)."""
    skipped = skipped if skipped is not None else []
    images = [decode_or_skip(p, on_bad_file, skipped) for p in files]
    out = [resize_center_crop(img, image_size) for img in images if img is not None]
    return np.stack(out) if out else np.zeros((0, 3, image_size, image_size), np.uint8)


def load_hub_images(name: str, image_size: int, cache_dir: Optional[str], limit: Optional[int]) -> np.ndarray:
    """Download (or reuse the local cache of) the hub data set with ``datasets`` and decode its
    ``image`` column. Needs internet on first use and ``pip install 'ddlab[hub]'``."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "data.source=hub needs the Hugging Face `datasets` library: pip install 'ddlab[hub]' "
            "(or use data.source=parquet / data.source=folder with data.path=<local copy>)"
        ) from e
    try:
        ds = datasets.load_dataset(name, split="train", cache_dir=cache_dir)
    except Exception as e:  # offline, unknown name, ...
        raise RuntimeError(
            f"could not load {name!r} from the Hugging Face hub: {e}. Offline, download the parquet file(s) "
            f"(https://huggingface.co/datasets/{name}, folder data/) on a connected machine and set "
            "data.source=parquet data.path=<file or folder>, or use data.source=folder for a folder of images"
        ) from e
    n = len(ds) if limit is None else min(limit, len(ds))
    return np.stack([resize_center_crop(ds[i]["image"].convert("RGB"), image_size) for i in range(n)])


class ButterfliesDataModule(ImageDataModule):
    """Unconditional RGB photos, resized (shorter side) and center-cropped to ``image_size``.

    ``source``: ``hub`` (``datasets.load_dataset(hub_name)``), ``parquet`` (``path`` = a parquet
    file or a folder searched recursively for ``*.parquet``), ``folder`` (``path`` = a folder of
    images searched recursively) or ``auto`` (parquet if ``path`` holds parquet files, else folder if
    ``path`` is a folder, else hub).

    The data set has no held-out split: train = all images (random horizontal flip when ``hflip``),
    val = reference set for FID = the same images, never flipped (first ``val_limit`` of them).
    All images are decoded once in ``setup`` into a ``(N, 3, S, S) uint8`` array (12 MB for 1000 at 64 px).
    Labels are all 0 (``num_classes`` must be 0).
    """

    def __init__(
        self,
        path: str = "data/butterflies",
        source: str = "auto",
        hub_name: str = HUB_NAME,
        hub_cache_dir: Optional[str] = None,
        image_size: int = 64,
        channels: int = 3,
        num_classes: int = 0,
        hflip: bool = True,
        **kwargs,
    ):
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r}: choose from {', '.join(SOURCES)}")
        if channels != 3:
            raise ValueError(f"data.channels must be 3 for the butterflies (RGB), got {channels}")
        if num_classes != 0:
            raise ValueError(f"data.num_classes must be 0: the butterflies have no class labels, got {num_classes}")
        if int(image_size) < 1:
            raise ValueError(f"data.image_size must be a positive integer, got {image_size}")
        super().__init__(image_size=image_size, channels=3, num_classes=0, **kwargs)
        self.path = Path(path)
        self.source = source
        self.hub_name = hub_name
        self.hub_cache_dir = hub_cache_dir
        self.hflip = hflip
        self._images: Optional[np.ndarray] = None

    def resolved_source(self) -> str:
        """The source ``auto`` stands for, given what is at ``data.path``."""
        if self.source != "auto":
            return self.source
        if find_parquet(self.path):
            return "parquet"
        return "folder" if self.path.is_dir() else "hub"

    def load_images(self) -> np.ndarray:
        """All images (the first ``max(limit, val_limit)`` when limits are set): ``(N, 3, S, S) uint8``."""
        if self._images is not None:
            return self._images
        source = self.resolved_source()
        # decode only what the limited splits use (train: limit; val: val_limit or limit)
        cap = None if self.limit is None else max(int(self.limit), int(self.val_limit or self.limit))
        if source == "hub":
            images = load_hub_images(self.hub_name, self.image_size, self.hub_cache_dir, cap)
            where = f"{self.hub_name} (hub)"
        elif source == "parquet":
            files = find_parquet(self.path)
            if not files:
                raise FileNotFoundError(self._missing(f"no .parquet file at or below {self.path}"))
            images = read_parquet_images(files, self.image_size, cap, self.on_bad_file, self.skipped_files)
            where = f"{len(files)} parquet file(s) in {self.path}"
        else:
            if not self.path.is_dir():
                raise FileNotFoundError(self._missing(f"{self.path} is not a folder"))
            files = find_images(self.path)
            if cap is not None:
                files = files[:cap]
            images = read_folder_images(files, self.image_size, self.on_bad_file, self.skipped_files)
            where = f"{self.path} (folder)"
        if len(images) == 0:
            raise ValueError(f"no images found in {where} (looked for {', '.join(IMAGE_EXTENSIONS)} files or parquet `image` rows)")
        log.info("butterflies: %d images from %s at %d px", len(images), where, self.image_size)
        if self.skipped_files:
            log.warning("butterflies: skipped %d file(s) that could not be decoded (data.on_bad_file=skip)", len(self.skipped_files))
        self._images = images
        return images

    def _missing(self, why: str) -> str:
        return (
            f"butterflies: {why} (data.source={self.source}, data.path={self.path}). Expected the parquet file(s) of "
            f"{self.hub_name} (an `image` column of encoded PNG/JPEG bytes; from https://huggingface.co/datasets/{self.hub_name}) "
            "or a folder of images. Set data.path=<file or folder>; offline on the project machines use "
            "data.path=../shared/data/butterflies_leeds; online use data.source=hub."
        )

    def prepare_data(self) -> None:
        if self.resolved_source() == "hub":  # download once (rank 0); setup reads the cache
            self.load_images()

    def build_split(self, split: str):
        images = self.load_images()
        (images,) = self.apply_limit(images, split=split)
        labels = np.zeros(len(images), dtype=np.int64)
        return ArrayImageDataset(torch.from_numpy(images), labels, hflip=self.hflip and split == "train", name=f"butterflies {split}")
