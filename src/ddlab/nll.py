"""Likelihood entry point: ``python -m ddlab.nll ckpt=PATH n=1000`` (Hydra, ``configs/nll.yaml``).

Evaluates the variational bound in bits/dim (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021) on the
first ``n`` images of the held-out split, with its terms: the prior KL(q(x_T|x_0) || N(0, I)), the
sum of the KL terms for t > 0, and the discretised-Gaussian decoder -log p(x_0 | x_1). The data
module is rebuilt from the checkpoint's stored data config (``data=<name>`` replaces it,
``data_dir=...`` moves it). Writes ``<out>/nll.json``. Costs ``num_timesteps`` network calls per batch.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ddlab import config as _config  # noqa: F401  (registers resolvers)
from ddlab.sample import resolve_device

log = logging.getLogger("ddlab.nll")


def data_config(cfg: DictConfig, run_cfg: dict) -> dict:
    """The held-out data config: ``cfg.data`` if given, else the checkpoint's, with ``data_dir`` applied."""
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else dict(run_cfg["data"])
    if cfg.get("data_dir") is not None and "data_dir" in data:
        data["data_dir"] = str(cfg.data_dir)
    data["val_limit"] = int(cfg.n)
    data["limit"] = None
    return data


def nll(cfg: DictConfig) -> dict:
    """Bits/dim of ``cfg.ckpt`` on ``cfg.n`` held-out images; returns the JSON record."""
    from hydra.utils import instantiate

    from ddlab.checkpoint import load_checkpoint

    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    n, bs = int(cfg.n), int(cfg.batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"n and batch_size must be positive integers, got n={n}, batch_size={bs}")
    device = resolve_device(str(cfg.device))
    loaded = load_checkpoint(cfg.ckpt, use_ema=bool(cfg.ema), device=device)
    model, diffusion = loaded.model, loaded.diffusion
    dm = instantiate(data_config(cfg, loaded.config))
    dm.setup("validate")
    ds = dm.val_set
    n = min(n, len(ds))
    conditional = int(getattr(model, "num_classes", 0)) > 0

    torch.manual_seed(int(cfg.seed))  # calc_bpd_loop draws the forward-process noise with randn_like
    terms = {"total_bpd": [], "prior_bpd": [], "decoder_bpd": [], "vb_sum": []}
    batches = range(0, n, bs)
    if cfg.progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"bits/dim on {n} images", unit="batch")
    for start in batches:
        items = [ds[i] for i in range(start, min(start + bs, n))]
        x = torch.stack([it[0] for it in items]).to(device)
        y = torch.as_tensor([int(it[1]) for it in items], device=device) if conditional else None
        out = diffusion.calc_bpd_loop(model, x, y, clip_x0=bool(cfg.clip_x0))
        for k in terms:
            terms[k].append(out[k].double().cpu())
    vals = {k: torch.cat(v) for k, v in terms.items()}
    total = vals["total_bpd"]
    record = {
        "bits_per_dim": total.mean().item(),
        "bits_per_dim_stderr": (total.std().item() / math.sqrt(n)) if n > 1 else float("nan"),
        "prior_bpd": vals["prior_bpd"].mean().item(),
        "decoder_bpd": vals["decoder_bpd"].mean().item(),
        "vb_sum_bpd": vals["vb_sum"].mean().item(),
        "n": n,
        "split": "val",
        "conditional": conditional,
        "num_timesteps": diffusion.num_timesteps,
        "clip_x0": bool(cfg.clip_x0),
        "ema": loaded.ema,
        "global_step": loaded.global_step,
        "ckpt": str(Path(cfg.ckpt).resolve()),
    }
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "nll.json").write_text(json.dumps(record, indent=2))
    log.info("bits/dim %.4f +- %.4f (prior %.4f, vb sum %.4f, decoder %.4f) on %d held-out images -> %s",
             record["bits_per_dim"], record["bits_per_dim_stderr"], record["prior_bpd"], record["vb_sum_bpd"],
             record["decoder_bpd"], n, out_dir / "nll.json")
    return record


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="nll")
def main(cfg: DictConfig) -> Any:
    return nll(cfg)["bits_per_dim"]


if __name__ == "__main__":
    main()
