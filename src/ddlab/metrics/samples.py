"""Reading and writing sample sets: a folder of PNGs, or an OpenAI-evaluator ``.npz``
(``arr_0``: ``(N, H, W, C)`` uint8, optional ``arr_1``: labels)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_samples(path: str | os.PathLike, key: str = "samples") -> np.ndarray:
    """``(N, H, W, C)`` uint8 (C in {1, 3}) from a ``.npz`` (``arr_0``) or an image folder (sorted by name)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                if "arr_0" not in z.files:
                    raise ValueError(f"{key}={p}: the npz holds {z.files}, expected 'arr_0' (N, H, W, C) uint8")
                x = np.asarray(z["arr_0"])
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{key}={p}: cannot read the npz ({type(e).__name__}: {e})") from e
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"{key}={p}: arr_0 must be (N, H, W, C) uint8 with C in 1 or 3, got {x.shape} {x.dtype}")
        return x
    if p.is_dir():
        from PIL import Image

        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"{key}={p}: no image files ({', '.join(IMAGE_EXTS)}) in the folder")
        imgs = []
        for f in files:
            with Image.open(f) as im:
                a = np.asarray(im.convert("L" if im.mode in ("L", "I", "I;16", "1") else "RGB"))
            imgs.append(a[..., None] if a.ndim == 2 else a)
        shapes = {a.shape for a in imgs}
        if len(shapes) != 1:
            raise ValueError(f"{key}={p}: images differ in size/channels: {sorted(shapes)[:4]}")
        return np.stack(imgs)
    raise FileNotFoundError(f"{key}={p}: no such .npz file or image folder")


def load_sample_labels(path: str | os.PathLike) -> np.ndarray | None:
    """The labels (``arr_1``) stored beside the samples of an ``.npz``, or ``None``."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".npz"):
        return None
    with np.load(p, allow_pickle=False) as z:
        return np.asarray(z["arr_1"]).astype(np.int64) if "arr_1" in z.files else None


def save_samples_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write ``arr_0`` (uint8 NHWC) and, when given, ``arr_1`` (labels) — the OpenAI evaluator layout."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": np.asarray(images, dtype=np.uint8)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    np.savez(p, **arrays)
    return p


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``(N, H, W, C)`` images to ``size x size`` (bilinear with antialiasing, as
    ``torchvision``'s ``Resize`` does), rounding back to uint8."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(int(size), int(size)), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def check_sample_size(shape: tuple, reference: tuple, key: str = "samples", resize: bool = False) -> bool:
    """Compare sample ``(H, W, C)`` with the reference's ``(size, channels)``; returns True when the
    samples must be resized (only with ``resize=True``), raises with both sizes otherwise."""
    h, w, c = (int(v) for v in shape)
    size, channels = (int(v) for v in reference)
    if c != channels:
        raise ValueError(f"{key}: the samples have {c} channel(s), the reference data {channels}; "
                         "evaluate against a data set with the same channels (data=<name>)")
    if (h, w) == (size, size):
        return False
    if not resize:
        raise ValueError(f"{key}: the samples are {h}x{w} px, the reference images {size}x{size} px; FID across sizes is "
                         f"not comparable. Evaluate against a {h} px data config (e.g. data.image_size={h}) or add resize=true "
                         f"to resize the samples to {size} px")
    return True
