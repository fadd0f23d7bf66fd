"""Sampling entry point: ``python -m ddlab.sample ckpt=PATH [sampler=ddim sampler.steps=50 n=64
guidance_scale=3 labels=[7] out=DIR]`` (Hydra, ``configs/sample.yaml``).

Rebuilds the network (EMA weights unless ``ema=false``) and the diffusion from the checkpoint, draws
``n`` images in batches with the configured ``sampler/`` and writes ``grid.png`` and
``samples.npz`` (``arr_0``: uint8 ``(N, H, W, C)``; ``arr_1``: int64 labels, -1 = unconditional).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ddlab import config as _config  # noqa: F401  (registers resolvers)
from ddlab import runtime

log = logging.getLogger("ddlab.sample")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_labels(labels: Optional[Sequence[int]], n: int, num_classes: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    """``(n,)`` int64 labels: the given list (one per image, or shorter and cycled), uniform random
    classes when ``labels`` is None for a conditional model, and None for an unconditional one."""
    if labels is None:
        if num_classes == 0:
            return None
        return torch.randint(0, num_classes, (n,), generator=generator)
    if isinstance(labels, int):
        labels = [labels]
    labels = [int(v) for v in labels]
    if num_classes == 0:
        raise ValueError(f"labels={labels}: this model was trained without labels (model.num_classes=0); use labels=null")
    if not labels or len(labels) > n:
        raise ValueError(f"labels: give between 1 and n={n} labels (one per image, or a shorter list that is cycled), got {len(labels)}")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"labels: {bad} outside [0, {num_classes - 1}] (the model has {num_classes} classes)")
    reps = math.ceil(n / len(labels))
    return torch.tensor(labels * reps, dtype=torch.long)[:n]


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, C)`` uint8 (round to the nearest of 256 levels)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample(cfg: DictConfig) -> dict:
    """Draw ``cfg.n`` images from ``cfg.ckpt``; returns ``{"images": uint8 NHWC, "labels", "grid", "npz"}``."""
    from hydra.utils import instantiate
    from torchvision.utils import save_image

    from ddlab.checkpoint import load_checkpoint

    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    n, bs = int(cfg.n), int(cfg.batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"n and batch_size must be positive integers, got n={n}, batch_size={bs}")
    device = resolve_device(str(cfg.device))
    runtime.apply(**(cfg.get("runtime") or {}), device=device)
    loaded = load_checkpoint(cfg.ckpt, use_ema=bool(cfg.ema), device=device)
    model, diffusion = loaded.model, loaded.diffusion
    sampler = instantiate(cfg.sampler)
    num_classes = int(getattr(model, "num_classes", 0))
    if cfg.guidance_scale is None:
        w = sampler.guidance_scale if num_classes else 1.0
    else:
        w = float(cfg.guidance_scale)  # explicit: guidance on an unconditional model is an error below

    g_cpu = torch.Generator().manual_seed(int(cfg.seed))
    labels_cfg = OmegaConf.to_container(cfg.labels, resolve=True) if OmegaConf.is_config(cfg.labels) else cfg.labels
    y_all = make_labels(labels_cfg, n, num_classes, g_cpu)
    if y_all is None:
        from ddlab.diffusion import check_guidance

        check_guidance(model, None, w)
    shape = (model.in_channels, model.image_size, model.image_size)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    batches = range(0, n, bs)
    if cfg.progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling {n} images", unit="batch")
    chunks = []
    for start in batches:
        b = min(bs, n - start)
        y = None if y_all is None else y_all[start:start + b].to(device)
        chunks.append(sampler.sample(model, diffusion, (b, *shape), y=y, generator=gen, guidance_scale=w).cpu())
    images = torch.cat(chunks)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    arr = to_uint8_nhwc(images)
    lab = np.full(n, -1, dtype=np.int64) if y_all is None else y_all.numpy().astype(np.int64)
    np.savez(out / "samples.npz", arr_0=arr, arr_1=lab)
    nrow = int(cfg.nrow) if cfg.get("nrow") else max(1, int(math.ceil(math.sqrt(n))))
    save_image(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0, out / "grid.png", nrow=nrow, padding=2)
    log.info("wrote %d samples (%s weights, step %d, guidance %.3g) to %s", n, "EMA" if loaded.ema else "live",
             loaded.global_step, w, out)
    return {"images": arr, "labels": lab, "grid": out / "grid.png", "npz": out / "samples.npz", "guidance_scale": w}


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> Any:
    sample(cfg)


if __name__ == "__main__":
    main()
