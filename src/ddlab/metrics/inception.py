"""Inception-v3 features through torch-fidelity (``inception-v3-compat``, the TF-FID network).

Weights, in order of precedence: an explicit ``weights_path`` (``fid.weights_path=`` /
``callbacks.fid.weights_path=``), the ``DDLAB_INCEPTION_WEIGHTS`` environment variable, the file that
torch-fidelity's own download left in the torch hub cache, and finally torch-fidelity's download
(only when the host is reachable; offline machines get an error that says how to provide the file).
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import torch

EXTRACTOR = "inception-v3-compat"
FEATURE_LAYERS = ("2048", "logits_unbiased")  # FID / KID / precision-recall features, Inception Score logits
ENV_WEIGHTS = "DDLAB_INCEPTION_WEIGHTS"


def _url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def _hub_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / _url().rsplit("/", 1)[-1]


def _online(host: str = "github.com", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_weights(weights_path: str | os.PathLike | None = None, key: str = "fid.weights_path") -> Path:
    """The Inception weights file to use; downloads with torch-fidelity's URL when none is given.

    Raises ``FileNotFoundError`` naming ``key`` when a given path does not exist, and
    ``RuntimeError`` with instructions when no file is available and the host is offline.
    """
    given = weights_path or os.environ.get(ENV_WEIGHTS) or None
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            src = f"{key}={given}" if weights_path else f"${ENV_WEIGHTS}={given}"
            raise FileNotFoundError(f"{src}: no such Inception weights file; point it at torch-fidelity's {_url().rsplit('/', 1)[-1]}")
        return p
    hub = _hub_file()
    if hub.is_file():
        return hub
    if not _online():
        raise RuntimeError(
            "the Inception-v3 weights for FID are not available and this machine is offline. On a machine with "
            f"internet, download {_url()} (or run any torch-fidelity metric once; it lands in {hub}), copy the file "
            f"here and pass {key}=/path/to/{hub.name} or set {ENV_WEIGHTS}=/path/to/{hub.name}."
        )
    from torch.hub import load_state_dict_from_url

    load_state_dict_from_url(_url(), progress=True)  # writes the hub file
    return hub


_HASHES: dict = {}


def weights_id(path: Path) -> str:
    """Short content hash of a weights file (8 hex digits), part of every reference-statistics key."""
    st = path.stat()
    k = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[k] = h.hexdigest()[:8]
    return _HASHES[k]


def to_uint8_nchw3(images) -> torch.Tensor:
    """Images as torch-fidelity wants them: ``(N, 3, H, W) uint8``.

    Accepts ``(N, H, W, C)`` or ``(N, C, H, W)`` uint8 arrays/tensors with C in {1, 3}
    (grey images are repeated to 3 channels), or ``(N, H, W)`` grey.
    """
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got {x.dtype} (use ddlab.data.to_numpy_uint8 for [-1, 1] tensors)")
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise ValueError(f"images must be (N, H, W, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class InceptionFeatures:
    """torch-fidelity's Inception-v3 feature extractor with ddlab's weight resolution.

    ``extract(images)`` returns ``{"fid": (N, 2048) float64, "logits": (N, 1008) float64}`` (the pool
    features behind FID / KID / precision-recall and the logits behind the Inception Score).
    ``name`` (``inception-v3-compat-<hash>``) identifies the network and its weights.
    """

    kind = "inception"

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, key: str = "fid.weights_path"):
        from torch_fidelity.utils import create_feature_extractor

        if int(batch_size) < 1:
            raise ValueError(f"{key.rsplit('.', 1)[0]}.batch_size must be >= 1, got {batch_size}")
        self.weights_path = resolve_weights(weights_path, key)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.net = create_feature_extractor(
            EXTRACTOR, list(FEATURE_LAYERS), cuda=False, feature_extractor_weights_path=str(self.weights_path), verbose=False
        ).to(self.device)
        self.name = f"{EXTRACTOR}-{weights_id(self.weights_path)}"

    def extract(self, images, progress: bool = True, desc: str = "Inception features") -> dict:
        """Features of uint8 images (see :func:`to_uint8_nchw3`), in batches of ``batch_size``."""
        out = extract_layers(self.net, images, self.batch_size, self.device, progress, desc)
        return {"fid": out["2048"], "logits": out["logits_unbiased"]}


@torch.no_grad()
def extract_layers(net, images, batch_size: int, device: torch.device, progress: bool = True, desc: str = "features") -> dict:
    """Run a torch-fidelity feature extractor over uint8 images (see :func:`to_uint8_nchw3`) in batches;
    returns ``{layer: (N, D) float64 array}`` for the layers it was created with, with a progress bar."""
    from tqdm.auto import tqdm

    x = to_uint8_nchw3(images)
    if len(x) == 0:
        raise ValueError("no images to extract features from")
    out: dict = {k: [] for k in net.get_requested_features_list()}
    with tqdm(total=len(x), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in x.split(batch_size):
            feats = net.convert_features_tuple_to_dict(net(batch.to(device)))
            for k in out:
                out[k].append(feats[k].double().cpu())
            bar.update(len(batch))
    return {k: torch.cat(v).numpy() for k, v in out.items()}
