"""A small MNIST classifier as a domain feature extractor (``fid.feature_extractor=mnist_cnn``).

Inception-v3 describes digits poorly and its weights need a download; this CNN trains on the MNIST
train split on a CPU in a few minutes (>= 99 % test accuracy) and gives an offline quality signal:

* a Frechet distance on its 128-d penultimate features ("domain FID") and KID, through the same
  torch-fidelity code path, reference-statistics cache and ``make fid`` as Inception;
* for class-conditional models, its accuracy on guided samples w.r.t. the requested labels, and the
  entropy of the histogram of predicted classes (``log 10 = 2.303`` nats when every digit is drawn
  equally often; lower means mode collapse).

Train and save it with::

    python -m ddlab.metrics.classifier train data=mnist            # -> logs/classifiers/mnist_cnn.pt
    python -m ddlab.metrics.classifier train data=mnist out=cnn.pt epochs=3 limit=10000
    python -m ddlab.metrics.classifier eval path=cnn.pt           # test accuracy of a saved file

The file holds the weights (``state_dict``), the test ``accuracy``, ``sha256`` (hash of the weights,
part of every reference-statistics key) and the training settings. Evaluation finds it through
``fid.classifier_path`` / ``callbacks.fid.classifier_path``, the ``DDLAB_MNIST_CNN`` environment variable,
or the default ``<DDLAB_LOG_DIR or logs>/classifiers/mnist_cnn.pt``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NAME = "mnist_cnn"
ENV_PATH = "DDLAB_MNIST_CNN"
INPUT_SIZE = 32
FEATURES = ("features", "logits")  # 128-d penultimate activations (FID/KID), 10 class logits (IS, accuracy)


def default_path() -> Path:
    """``$DDLAB_MNIST_CNN``, else ``<$DDLAB_LOG_DIR or logs>/classifiers/mnist_cnn.pt``."""
    if os.environ.get(ENV_PATH):
        return Path(os.environ[ENV_PATH]).expanduser()
    return Path(os.environ.get("DDLAB_LOG_DIR", "logs")) / "classifiers" / f"{NAME}.pt"


class MnistCNN(nn.Module):
    """Conv(32)x2 - pool - Conv(64)x2 - pool - FC(128) - FC(10) on ``(N, 1, 32, 32)`` float images in [-1, 1]
    (28 px digits zero-padded to 32, as ``data=mnist`` gives them). About 0.6 M parameters."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * w * (INPUT_SIZE // 4) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim, "dropout": dropout}

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: (N, 1, 32, 32)`` in [-1, 1] -> ``(features (N, 128) >= 0, logits (N, 10))``."""
        h = F.relu(self.fc(self.conv(x).flatten(1)))
        return h, self.head(self.drop(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` (C = 1 or 3, grey repeated) or float in [-1, 1] -> float ``(N, 1, 32, 32)`` in [-1, 1].
    28 px digits are zero-padded (black border) to 32; other sizes are resized bilinearly."""
    x = images
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"mnist_cnn takes (N, 1|3, H, W) images, got shape {tuple(x.shape)}")
    x = x[:, :1] if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) == (28, 28):
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    elif (h, w) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


def weights_hash(state_dict: dict) -> str:
    """sha256 of the weights (names, shapes and bytes in key order); 16 hex digits."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def save_classifier(model: MnistCNN, path: str | os.PathLike, **record: Any) -> Path:
    """Write ``{"state_dict", "config", "sha256", **record}`` atomically (temporary file + rename)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"state_dict": sd, "config": model.config, "sha256": weights_hash(sd), "name": NAME, **record}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, p)
    return p


def load_classifier(path: str | os.PathLike | None = None, key: str = "fid.classifier_path") -> tuple[MnistCNN, dict]:
    """The saved classifier (eval mode) and its record; the weights' hash is checked against the stored one."""
    p = Path(path).expanduser() if path else default_path()
    if not p.is_file():
        how = f"{key}={path}" if path else f"the default location {p} (or ${ENV_PATH})"
        raise FileNotFoundError(
            f"{how}: no MNIST classifier file. Train one (a few minutes on a CPU) with "
            f"`python -m ddlab.metrics.classifier train data=mnist out={p}` and pass {key}=... or set {ENV_PATH}"
        )
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        model = MnistCNN(**blob["config"])
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{p} is not a readable mnist_cnn classifier ({type(e).__name__}: {e}); train it again") from e
    if weights_hash(model.state_dict()) != blob.get("sha256"):
        raise RuntimeError(f"{p}: the weights do not match their stored sha256 (corrupt or edited file); train it again")
    return model.eval(), {k: v for k, v in blob.items() if k != "state_dict"}


# ---------------------------------------------------------------------------------------------- torch-fidelity
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
        from .inception import extract_layers

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


# ---------------------------------------------------------------------------------------------- training
def _mnist_tensors(data_dir: str | os.PathLike, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from ddlab.data.mnist import load_mnist

    images, labels = load_mnist(data_dir, split, download=True)
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.array(images, copy=True)).float().div(127.5).sub(1.0)[:, None]
    return F.pad(x, (2, 2, 2, 2), value=-1.0), torch.from_numpy(np.asarray(labels)).long()


@torch.no_grad()
def accuracy(model: MnistCNN, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    return correct / len(x)


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (one shift per batch; the border is background)."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(data_dir: str | os.PathLike, out: str | os.PathLike | None = None, epochs: int = 3, batch_size: int = 128,
                     lr: float = 2e-3, limit: int | None = None, test_limit: int | None = None, seed: int = 0,
                     progress: bool = True) -> dict:
    """Train :class:`MnistCNN` on the MNIST train split (Adam, one-cycle cosine LR, random shifts), report the
    test-split accuracy and save it to ``out`` (default :func:`default_path`). Returns the saved record."""
    from tqdm.auto import tqdm

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = _mnist_tensors(data_dir, "train", limit)
    xt, yt = _mnist_tensors(data_dir, "test", test_limit)
    model = MnistCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="mnist_cnn", unit="step", disable=not progress)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    acc = accuracy(model, xt, yt)
    record = {"accuracy": acc, "test_images": len(xt), "train_images": len(x), "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "seed": seed, "train_seconds": round(time.perf_counter() - t0, 1)}
    path = save_classifier(model, out or default_path(), **record)
    model.eval()
    return {**record, "sha256": weights_hash(model.state_dict()), "path": str(path)}


def _parse(argv: list[str]) -> tuple[str, dict]:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("train", "eval"):
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    opts = {}
    for a in argv[1:]:
        if "=" not in a:
            raise SystemExit(f"arguments are key=value, got {a!r} (see --help)")
        k, v = a.split("=", 1)
        opts[k] = v
    return argv[0], opts


def main(argv: list[str] | None = None) -> dict:
    cmd, o = _parse(sys.argv[1:] if argv is None else argv)
    data_dir = o.pop("data_dir", os.environ.get("DDLAB_DATA_DIR", "data"))
    if cmd == "train":
        data = o.pop("data", "mnist")
        if data != "mnist":
            raise SystemExit(f"data={data}: only data=mnist has a domain classifier")
        known = {"out": str, "epochs": int, "batch_size": int, "lr": float, "limit": int, "test_limit": int, "seed": int}
        bad = set(o) - set(known)
        if bad:
            raise SystemExit(f"unknown option(s) {sorted(bad)}; choose from data, data_dir, {', '.join(known)}")
        rec = train_classifier(data_dir, **{k: known[k](v) for k, v in o.items()})
    else:
        model, rec = load_classifier(o.get("path"), key="path")
        xt, yt = _mnist_tensors(data_dir, "test", int(o["test_limit"]) if "test_limit" in o else None)
        rec = {**rec, "accuracy_now": accuracy(model, xt, yt)}
    print(json.dumps(rec, indent=2, default=str))
    return rec


if __name__ == "__main__":
    main()
