"""Likelihood entry point: ``python -m ddlab.nll ckpt=PATH n=1000`` (Hydra, ``configs/nll.yaml``).

Evaluates the variational bound in bits/dim (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021) on the
first ``n`` images of the held-out split, with its terms: the prior KL(q(x_T|x_0) || N(0, I))
(``bpd_prior``), the sum of the KL terms for t > 0 (``bpd_vb``), and the discretised-Gaussian decoder
-log p(x_0 | x_1) (``bpd_decoder``), through :func:`ddlab.evaluation.bits_per_dim` (the same numbers
as ``ddlab.fid bpd.n=...`` and the ``val/bpd`` callback). The data module is rebuilt from the
checkpoint's stored data config (``data=<name>`` replaces it, ``data_dir=...`` moves it). Writes
``<out>/nll.json``. Costs ``num_timesteps`` network calls per batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ddlab import config as _config  # noqa: F401  (registers resolvers)
from ddlab import evaluation as ev

log = logging.getLogger("ddlab.nll")


def nll(cfg: DictConfig) -> dict:
    """Bits/dim of ``cfg.ckpt`` on ``cfg.n`` held-out images; returns the JSON record."""
    from hydra.utils import instantiate

    source = ev.model_source(cfg.get("ckpt"), cfg.get("pretrained"))
    n, bs = int(cfg.n), int(cfg.batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"n and batch_size must be positive integers, got n={n}, batch_size={bs}")
    device = ev.setup_runtime(str(cfg.device), cfg.get("torch_threads"), cfg.get("runtime"))
    loaded = ev.load_model(cfg.get("ckpt"), cfg.get("pretrained"), bool(cfg.ema), device)
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else None
    dm = instantiate(ev.data_config(data, loaded.config, cfg.get("data_dir"), n))
    ds = dm.reference_dataset()
    n = min(n, len(ds))
    clip = bool(cfg.clip_x0)
    terms = ev.bits_per_dim(loaded.model, loaded.diffusion, ds, range(n), bs, seed=int(cfg.seed), clip_x0=clip,
                            progress=bool(cfg.progress))
    record = {**ev.summarize_bpd(terms, clip), "split": "val", "bpd_conditional": int(getattr(loaded.model, "num_classes", 0)) > 0,
              "num_timesteps": loaded.diffusion.num_timesteps, "ema": loaded.ema, "global_step": loaded.global_step,
              "seed": int(cfg.seed), "ckpt": str(Path(cfg.ckpt).resolve()) if cfg.get("ckpt") else None,
              "pretrained": cfg.get("pretrained"), "model": source}
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "nll.json").write_text(json.dumps(record, indent=2))
    log.info("bits/dim %.4f +- %.4f (prior %.4f, vb %.4f, decoder %.4f; clip_x0=%s) on %d held-out images -> %s",
             record["bpd"], record["bpd_stderr"], record["bpd_prior"], record["bpd_vb"], record["bpd_decoder"], clip, n,
             out_dir / "nll.json")
    return record


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="nll")
def main(cfg: DictConfig) -> Any:
    return nll(cfg)["bpd"]


if __name__ == "__main__":
    main()
