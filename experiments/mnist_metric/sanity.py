"""Sanity figures for the MNIST domain metric (mnist_cnn): what good and bad numbers look like.

Scores real and corrupted digits exactly as `make bench-quality` / `ddlab.fid fid.feature_extractor=mnist_cnn`
score samples: N images against the statistics of the full MNIST test split (10k, 32 px, zero-padded).

    python experiments/mnist_metric/sanity.py [--n 500] [--out experiments/mnist_metric/sanity.md]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> str:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--data-dir", default=os.environ.get("DDLAB_DATA_DIR", "data"))
    p.add_argument("--classifier", default=None)
    p.add_argument("--cache-dir", default="logs/fid_stats")
    p.add_argument("--out", default=str(Path(__file__).with_name("sanity.md")))
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    from ddlab.data import MNISTDataModule
    from ddlab.data.mnist import load_mnist
    from ddlab.metrics import Evaluator

    dm = MNISTDataModule(data_dir=args.data_dir, val_limit=None)
    data_cfg = {"_target_": "ddlab.data.MNISTDataModule", "image_size": 32, "resize": "pad", "channels": 1, "num_classes": 10}
    ev = Evaluator(data_cfg, dm, cache_dir=args.cache_dir, feature_extractor="mnist_cnn", classifier_path=args.classifier,
                   kid=True, isc=False, progress=False, kid_subsets=20, kid_subset_size=min(500, args.n))
    rng = np.random.default_rng(0)
    train_x, train_y = load_mnist(args.data_dir, "train")
    test_x, test_y = load_mnist(args.data_dir, "test")
    idx = rng.choice(len(train_x), args.n, replace=False)
    x, y = np.pad(train_x[idx], ((0, 0), (2, 2), (2, 2)))[..., None], train_y[idx]
    tidx = rng.choice(len(test_x), args.n, replace=False)
    tx, ty = np.pad(test_x[tidx], ((0, 0), (2, 2), (2, 2)))[..., None], test_y[tidx]

    def noisy(a, sigma):
        return np.clip(a.astype(np.float64) + rng.normal(0, 255 * sigma, a.shape), 0, 255).astype(np.uint8)

    def blurred(a, k):
        t = torch.from_numpy(a).permute(0, 3, 1, 2).float()
        t = torch.nn.functional.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False)
        return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    cases = [
        ("test digits (part of the reference)", tx, ty),
        ("train digits", x, y),
        ("train digits, wrong labels (shifted by 1)", x, (y + 1) % 10),
        ("train digits of class 0-4 only", x[y < 5], y[y < 5]),
        ("train digits + noise sigma 0.1", noisy(x, 0.1), y),
        ("train digits + noise sigma 0.2", noisy(x, 0.2), y),
        ("train digits + noise sigma 0.4", noisy(x, 0.4), y),
        ("train digits, 3x3 box blur", blurred(x, 3), y),
        ("pure noise", rng.integers(0, 256, x.shape).astype(np.uint8), y),
    ]
    lines = [f"Domain metric (`mnist_cnn`) of {args.n} images against the full MNIST test split (10k):", "",
             "| images | domain FID | KID | class acc | class entropy (max 2.303) |", "|---|---|---|---|---|"]
    for name, a, lab in cases:
        s = ev.evaluate(a, labels=lab)
        lines.append(f"| {name} | {s['fid']:.3f} | {s['kid_mean']:.4f} | {s['class_accuracy']:.3f} | {s['class_entropy']:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
