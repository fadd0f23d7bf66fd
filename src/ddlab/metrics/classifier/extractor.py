"""The classifier as a torch-fidelity feature extractor (``mnist_cnn``) and the class metrics of samples."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .model import FEATURES, INPUT_SIZE, NAME, default_path, load_classifier, to_classifier_input

def _register() -> None:
    """Register ``mnist_cnn`` with torch-fidelity (idempotent), so ``create_feature_extractor("mnist_cnn", ...)``
    and the ``feature_extractor="mnist_cnn"`` argument of its metrics work."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if NAME in FEATURE_EXTRACTORS_REGISTRY:
        return

    class FeatureExtractorMnistCNN(FeatureExtractorBase):
        """torch-fidelity feature extractor: uint8 ``(N, 3, H, W)`` -> ``(features (N, 128), logits (N, 10))``."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            for f in features_list:
                if f not in FEATURES:
                    raise ValueError(f"mnist_cnn provides the features {FEATURES}, not {f!r}")
            self.net, self.record = load_classifier(feature_extractor_weights_path)
            self.requires_grad_(False)

        @staticmethod
        def get_provided_features_list():
            return FEATURES

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return (torch.rand([1, 3, INPUT_SIZE, INPUT_SIZE]) * 255).to(torch.uint8)

        def forward(self, x):
            if x.dtype != torch.uint8:
                raise TypeError(f"mnist_cnn expects uint8 images as torch-fidelity passes them, got {x.dtype}")
            feats, logits = self.net.features_and_logits(to_classifier_input(x))
            out = {"features": feats, "logits": logits}
            return tuple(out[f] for f in self.features_list)

    torch_fidelity.register_feature_extractor(NAME, FeatureExtractorMnistCNN)


class ClassifierFeatures:
    """The registered torch-fidelity ``mnist_cnn`` extractor behind the interface of
    :class:`ddlab.metrics.inception.InceptionFeatures`: ``extract(images)`` returns
    ``{"fid": (N, 128), "logits": (N, 10)}`` float64; ``name`` is ``mnist_cnn-<weights hash>``."""

    kind = "classifier"

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 256, key: str = "fid.classifier_path"):
        from torch_fidelity.utils import create_feature_extractor

        _register()
        if int(batch_size) < 1:
            raise ValueError(f"{key.rsplit('.', 1)[0]}.batch_size must be >= 1, got {batch_size}")
        self.weights_path = Path(weights_path).expanduser() if weights_path else default_path()
        load_classifier(self.weights_path if weights_path else None, key)  # clear error before torch-fidelity's
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.net = create_feature_extractor(NAME, list(FEATURES), cuda=False,
                                            feature_extractor_weights_path=str(self.weights_path), verbose=False).to(self.device)
        self.record = self.net.record
        self.name = f"{NAME}-{self.record['sha256'][:8]}"

    def extract(self, images, progress: bool = True, desc: str = "mnist_cnn features") -> dict:
        from ddlab.metrics.inception import extract_layers

        out = extract_layers(self.net, images, self.batch_size, self.device, progress, desc)
        return {"fid": out["features"], "logits": out["logits"]}


def class_metrics(logits: np.ndarray, labels: np.ndarray | None, num_classes: int = 10) -> dict:
    """``class_entropy``: entropy (nats) of the histogram of predicted classes (``log K`` = all classes
    equally often); with ``labels`` (the classes asked for; negative = unconditional) also
    ``class_accuracy``, the fraction of conditional samples classified as their label."""
    pred = np.asarray(logits).argmax(axis=1)
    hist = np.bincount(pred, minlength=num_classes).astype(np.float64)
    p = hist / hist.sum()
    out = {"class_entropy": float(-(p[p > 0] * np.log(p[p > 0])).sum()), "class_entropy_max": math.log(num_classes),
           "class_histogram": hist.astype(int).tolist()}
    if labels is not None:
        y = np.asarray(labels).astype(np.int64)
        cond = y >= 0
        if cond.any():
            out["class_accuracy"] = float((pred[cond] == y[cond]).mean())
    return out
