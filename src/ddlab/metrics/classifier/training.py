"""Training the MNIST classifier, and the ``python -m ddlab.metrics.classifier train|eval`` command."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .model import MnistCNN, default_path, load_classifier, save_classifier, weights_hash

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
        from ddlab.metrics import classifier  # the package docstring holds the usage

        print(classifier.__doc__)
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
