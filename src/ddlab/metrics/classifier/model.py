"""The MNIST classifier network, its input transform, and saving/loading its weights with a hash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

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
    """Write ``{"state_dict", "config", "sha256", **record}`` atomically (:func:`ddlab.io.atomic_write`)."""
    from ddlab.io import atomic_write

    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"state_dict": sd, "config": model.config, "sha256": weights_hash(sd), "name": NAME, **record}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(p) as f:
        torch.save(blob, f)
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
