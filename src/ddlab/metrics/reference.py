"""Reference statistics of real images, cached on disk.

One ``.npz`` per (data set, split, resolution, number of images, data variant, feature extractor):
``<key>.npz`` holds ``key`` (the same string), ``mu (D,)``, ``sigma (D, D)`` float64 of the
Inception pool features, ``num_images`` and, when KID / precision-recall ask for them,
``features (N, D)`` float32 (a file without them is recomputed when they are needed). A file whose stored key differs from its name's (stale), that cannot be read
(corrupt, truncated) or whose shapes do not fit the extractor's feature size (corrupt) is recomputed and rewritten atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("ddlab.metrics")

# data-config keys that do not change the reference images
_NOT_CONTENT = {"_target_", "data_dir", "batch_size", "num_workers", "pin_memory", "persistent_workers", "download",
                "limit", "drop_last", "val_limit"}


def dataset_name(data_cfg: Mapping[str, Any]) -> str:
    """Short data-set name from a data config: ``name`` if given, else the DataModule class name
    without ``DataModule`` (``ddlab.data.MNISTDataModule`` -> ``mnist``)."""
    if data_cfg.get("name"):
        return str(data_cfg["name"])
    target = str(data_cfg.get("_target_", "data")).rsplit(".", 1)[-1]
    return re.sub(r"datamodule$", "", target.lower()) or "data"


def reference_key(data_cfg: Mapping[str, Any], split: str, num_images: int, extractor: str) -> str:
    """``<dataset>-<split>-<res>px-<channels>c-n<N>-<variant>-<extractor>``; ``variant`` is a hash of the
    data-config keys that change the images (e.g. MNIST ``resize: pad|resize``)."""
    content = {k: v for k, v in sorted(data_cfg.items()) if k not in _NOT_CONTENT}
    variant = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:6]
    res = data_cfg.get("image_size", "x")
    ch = data_cfg.get("channels", "x")
    return f"{dataset_name(data_cfg)}-{split}-{res}px-{ch}c-n{int(num_images)}-{variant}-{extractor}"


@dataclass
class ReferenceStats:
    key: str
    mu: np.ndarray                    # (D,) float64
    sigma: np.ndarray                 # (D, D) float64
    num_images: int
    features: np.ndarray | None    # (N, D) float32 or None
    path: Path | None
    status: str                       # hit | miss | stale | corrupt | no-features | given

    def describe(self) -> dict:
        return {"key": self.key, "path": str(self.path) if self.path else None, "num_images": self.num_images, "cache": self.status}


def features_to_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` in float64 of ``(N, D)`` features (N >= 2)."""
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics

    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got shape {f.shape}")
    st = fid_features_to_statistics(torch.from_numpy(f))
    return np.asarray(st["mu"], dtype=np.float64), np.asarray(st["sigma"], dtype=np.float64)


def save_stats(path: Path, key: str, mu: np.ndarray, sigma: np.ndarray, num_images: int, features: np.ndarray | None = None) -> None:
    """Write the statistics atomically (:func:`ddlab.io.atomic_write`)."""
    from ddlab.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"key": np.array(key), "mu": mu, "sigma": sigma, "num_images": np.array(int(num_images))}
    if features is not None:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_stats(path: str | os.PathLike, expected_key: str | None = None, feature_dim: int | None = None) -> ReferenceStats:
    """Read a statistics file; raises ``ValueError`` on a corrupt file (unreadable, inconsistent shapes,
    non-finite values, or a feature size other than the extractor's ``feature_dim``) and ``KeyError``
    on a key mismatch."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            key = str(z["key"]) if "key" in z.files else p.stem
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
            n = int(z["num_images"]) if "num_images" in z.files else -1
            feats = np.asarray(z["features"]) if "features" in z.files else None
    except Exception as e:  # zip errors, truncation, missing arrays
        raise ValueError(f"corrupt reference statistics {p}: {type(e).__name__}: {e}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"corrupt reference statistics {p}: mu {mu.shape}, sigma {sigma.shape} (or non-finite values)")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != mu.shape[0]):
        raise ValueError(f"corrupt reference statistics {p}: features {feats.shape} do not match mu {mu.shape}")
    if feature_dim is not None and mu.shape[0] != int(feature_dim):
        raise ValueError(f"corrupt reference statistics {p}: {mu.shape[0]}-d statistics, but the feature extractor "
                         f"gives {int(feature_dim)}-d features")
    if expected_key is not None and key != expected_key:
        raise KeyError(f"stale reference statistics {p}: stored key {key!r}, expected {expected_key!r}")
    return ReferenceStats(key=key, mu=mu, sigma=sigma, num_images=n, features=feats, path=p, status="hit")


def reference_stats(key: str, cache_dir: str | os.PathLike, compute_features: Callable[[], np.ndarray],
                    need_features: bool = False, feature_dim: int | None = None) -> ReferenceStats:
    """Load ``<cache_dir>/<key>.npz`` or compute it with ``compute_features() -> (N, D)`` and cache it.

    ``need_features=True`` (KID, precision/recall) also requires the per-image features in the file.
    A file whose statistics are not ``feature_dim``-dimensional is corrupt: a warning, then recomputed.
    """
    path = Path(cache_dir) / f"{key}.npz"
    status = "miss"
    if path.is_file():
        try:
            st = load_stats(path, expected_key=key, feature_dim=feature_dim)
            if not need_features or st.features is not None:
                log.info("reference statistics: cache hit %s", path)
                return st
            status = "no-features"
        except KeyError as e:
            status = "stale"
            log.warning("%s; recomputing", e)
        except ValueError as e:
            status = "corrupt"
            log.warning("%s; recomputing", e)
    log.info("reference statistics: computing %s (%s)", key, status)
    feats = np.asarray(compute_features())
    mu, sigma = features_to_stats(feats)
    save_stats(path, key, mu, sigma, len(feats), feats.astype(np.float32) if need_features else None)
    return ReferenceStats(key=key, mu=mu, sigma=sigma, num_images=len(feats), features=feats, path=path, status=status)
