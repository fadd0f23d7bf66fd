"""Sampling entry point: ``python -m ddlab.sample ckpt=PATH [n=64 labels=[7] out=DIR sampler.steps=20
sampler.guidance_scale=3 | sampler=ddim ...]`` (Hydra, ``configs/sample.yaml``).

Rebuilds the network (EMA weights unless ``ema=false``), the diffusion and the sampler from the
checkpoint (its sampler and guidance unless overridden; ``sampler=<name>`` picks another), draws
``n`` images in batches with the seeding rules of :mod:`ddlab.evaluation` and writes ``grid.png`` and
``samples.npz`` (``arr_0``: uint8 ``(N, H, W, C)``; ``arr_1``: int64 labels, -1 = unconditional).
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ddlab import config as _config  # noqa: F401  (registers resolvers)
from ddlab import evaluation as ev

log = logging.getLogger("ddlab.sample")


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def sample(cfg: DictConfig) -> dict:
    """Draw ``cfg.n`` images from ``cfg.ckpt`` (or ``cfg.pretrained``); returns ``{"images", "labels", "grid",
    "npz", "sampler", "guidance_scale"}``."""
    ev.model_source(cfg.get("ckpt"), cfg.get("pretrained"))
    n, bs, seed = int(cfg.n), int(cfg.batch_size), int(cfg.seed)
    if n < 1 or bs < 1:
        raise ValueError(f"n and batch_size must be positive integers, got n={n}, batch_size={bs}")
    device = ev.setup_runtime(str(cfg.device), cfg.get("torch_threads"), cfg.get("runtime"))
    loaded = ev.load_model(cfg.get("ckpt"), cfg.get("pretrained"), bool(cfg.ema), device)
    k = int(getattr(loaded.model, "num_classes", 0))
    sampler, scfg, w = ev.run_sampler(loaded.config.get("sampler"), _container(cfg.get("sampler")), k)
    labels = ev.make_labels(_container(cfg.labels), n, k, seed)
    settings = ev.describe_sampler(sampler, scfg, w, loaded.diffusion)
    log.info("sampling %d images with %s (%s steps, guidance %.3g; %s weights, step %d)", n, settings["name"],
             settings["steps"], w, "EMA" if loaded.ema else "live", loaded.global_step)
    images = ev.generate_uint8(loaded.model, loaded.diffusion, sampler, n, bs, labels=labels, guidance_scale=w, seed=seed,
                               progress=bool(cfg.progress))
    files = ev.save_samples(cfg.out, images, labels, nrow=cfg.get("nrow"))
    log.info("wrote %d samples to %s", n, files["npz"].parent)
    return {"images": images, **files, "sampler": settings, "guidance_scale": w}


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> Any:
    sample(cfg)


if __name__ == "__main__":
    main()
