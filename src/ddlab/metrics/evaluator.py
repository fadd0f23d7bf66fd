"""Sample-quality evaluation against a data set's reference split: used by ``ddlab.fid`` and the
in-training FID callback."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .inception import InceptionFeatures

from .reference import ReferenceStats, load_stats, reference_key, reference_stats
from .scores import compute_scores

EXTRACTORS = ("inception", "mnist_cnn")


def make_features(feature_extractor: str = "inception", weights_path: str | None = None, classifier_path: str | None = None,
                  device: str | torch.device = "cpu", batch_size: int = 64, key_prefix: str = "fid"):
    """The feature extractor behind FID/KID: ``inception`` (torch-fidelity's Inception-v3) or ``mnist_cnn``
    (ddlab's MNIST classifier, registered with torch-fidelity; see :mod:`ddlab.metrics.classifier`)."""
    if feature_extractor == "inception":
        return InceptionFeatures(weights_path, device=device, batch_size=batch_size, key=f"{key_prefix}.weights_path")
    if feature_extractor == "mnist_cnn":
        from .classifier import ClassifierFeatures

        return ClassifierFeatures(classifier_path, device=device, batch_size=max(batch_size, 256), key=f"{key_prefix}.classifier_path")
    raise ValueError(f"{key_prefix}.feature_extractor: unknown extractor {feature_extractor!r}; choose from {', '.join(EXTRACTORS)}")


log = logging.getLogger("ddlab.metrics")

INCEPTION_DIM = 2048  # torch-fidelity's Inception-v3 pool features


def feature_dim(features) -> int:
    """The size of the FID feature vectors of an extractor built by :func:`make_features`."""
    if features.kind == "classifier":
        return int(features.record.get("config", {}).get("feature_dim", 128))
    return INCEPTION_DIM


def dataset_images_uint8(dataset, batch: int = 1024) -> np.ndarray:
    """All images of a ``(x in [-1, 1] (C, H, W), y)`` dataset as ``(N, H, W, C)`` uint8."""
    from ddlab.data import to_numpy_uint8

    out = []
    for start in range(0, len(dataset), batch):
        xs = torch.stack([dataset[i][0] for i in range(start, min(start + batch, len(dataset)))])
        out.append(to_numpy_uint8(xs))
    return np.concatenate(out)


class Evaluator:
    """FID (and optionally KID, Inception Score, precision/recall) of uint8 images against the
    cached reference statistics of ``datamodule.reference_dataset()`` (the un-augmented val split).

    Args:
        data_cfg: the data config (a mapping); with the extractor it forms the cache key.
        datamodule: the DataModule whose ``reference_dataset()`` supplies the real images; may be
            ``None`` when ``stats_path`` is given.
        cache_dir: folder of the ``<key>.npz`` statistics files.
        weights_path: Inception weights (see :func:`ddlab.metrics.inception.resolve_weights`).
        stats_path: a precomputed statistics ``.npz`` used as is (no key check).
        kid, isc, prc: also compute KID, Inception Score, precision/recall.
        feature_extractor: ``inception`` or ``mnist_cnn`` (then ``classifier_path`` locates the classifier,
            and ``evaluate`` adds ``class_entropy`` and, given labels, ``class_accuracy``).
    """

    def __init__(self, data_cfg: Mapping[str, Any] | None, datamodule=None, cache_dir: str | os.PathLike = "fid_stats",
                 weights_path: str | None = None, device: str | torch.device = "cpu", batch_size: int = 64,
                 split: str = "val", stats_path: str | None = None, kid: bool = False, isc: bool = True, prc: bool = False,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, progress: bool = True, key_prefix: str = "fid",
                 feature_extractor: str = "inception", classifier_path: str | None = None):
        if datamodule is None and stats_path is None:
            raise ValueError(f"{key_prefix}: give a data set (data=...) or a reference statistics file ({key_prefix}.reference_stats=...)")
        self.data_cfg = dict(data_cfg or {})
        self.datamodule = datamodule
        self.cache_dir = Path(cache_dir)
        self.split = split
        self.stats_path = stats_path
        self.kid, self.isc, self.prc = bool(kid), bool(isc), bool(prc)
        self.kid_subsets, self.kid_subset_size = int(kid_subsets), int(kid_subset_size)
        self.progress = progress
        self.features = make_features(feature_extractor, weights_path, classifier_path, device, batch_size, key_prefix)
        self._ref: ReferenceStats | None = None

    def reference(self) -> ReferenceStats:
        if self._ref is not None:
            return self._ref
        need = self.kid or self.prc
        if self.stats_path:
            st = load_stats(self.stats_path, feature_dim=feature_dim(self.features))
            st.status = "given"
            if need and st.features is None:
                raise ValueError(f"{self.stats_path} holds no per-image features; KID and precision/recall need them (or turn them off)")
            self._ref = st
            return st
        ds = self.datamodule.reference_dataset()
        key = reference_key(self.data_cfg, self.split, len(ds), self.features.name)

        def compute():
            images = dataset_images_uint8(ds)
            return self.features.extract(images, progress=self.progress, desc="reference features")["fid"]

        self._ref = reference_stats(key, self.cache_dir, compute, need_features=need, feature_dim=feature_dim(self.features))
        return self._ref

    def evaluate(self, images, features: dict | None = None, labels=None) -> dict:
        """Scores of ``images`` (uint8, ``(N, H, W, C)`` or ``(N, C, H, W)``, N >= 2) plus the reference used.
        ``labels``: the class asked for each image (negative = unconditional), for ``class_accuracy``."""
        ref = self.reference()
        if features is None:
            features = self.features.extract(images, progress=self.progress, desc="sample features")
        n = len(features["fid"])
        scores = compute_scores(features, ref, fid=True, kid_=self.kid, isc=self.isc, prc=self.prc,
                                kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size)
        if self.features.kind == "classifier":
            from .classifier import class_metrics

            scores.update(class_metrics(features["logits"], None if labels is None else np.asarray(labels)[:n]))
        return {**scores, "num_samples": n, "reference": {**ref.describe(), "extractor": self.features.name,
                                                          "weights": str(self.features.weights_path)}}
