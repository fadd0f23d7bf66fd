"""Sample-quality evaluation: ``python -m ddlab.fid ckpt=PATH n=... sampler.steps=...`` (Hydra).

Samples with the checkpoint's EMA weights (classes balanced and shuffled for class-conditional
models), or reads existing samples (``samples=DIR_or_npz``), and writes a JSON record with FID, KID,
Inception Score (precision/recall when ``fid.prc=true``), bits/dim when ``bpd.n > 0``, the sampler
settings, the number of samples and the reference statistics used.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ddlab import config as _config  # noqa: F401  (registers resolvers)
from ddlab import runtime

log = logging.getLogger("ddlab.fid")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _data_config(cfg: DictConfig, run_cfg: dict | None) -> dict | None:
    """The reference data config: ``data=...`` if given, else the training run's, with ``reference.*`` applied."""
    if cfg.get("data") is not None:
        data = OmegaConf.to_container(cfg.data, resolve=True)
    elif run_cfg is not None:
        data = dict(run_cfg["data"])
    else:
        return None
    if "data_dir" in data and cfg.reference.data_dir is not None:
        data["data_dir"] = str(cfg.reference.data_dir)
    data["val_limit"] = cfg.reference.limit
    data["limit"] = None  # else an unset val_limit falls back to the training run's data.limit
    return data


def _sampler(cfg: DictConfig, run_cfg: dict):
    from hydra.utils import instantiate

    from ddlab.diffusion.samplers import sampler_config

    over = {k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items() if v is not None}
    base = sampler_config(run_cfg["sampler"], over.pop("kind", None))  # `kind` switches the sampler
    base.update(over)
    base["progress"] = False  # one bar over the batches instead
    sampler = instantiate(base)
    return sampler, {"kind": sampler.name, **{k: v for k, v in base.items() if k not in ("_target_", "progress")}}


def bits_per_dim(model, diffusion, datamodule, n: int, batch_size: int, seed: int = 0, progress: bool = True) -> dict:
    """Mean variational bound in bits/dim (and its prior / decoder parts) over the first ``n``
    reference images; class-conditional models are conditioned on the true labels."""
    from tqdm.auto import tqdm

    ds = datamodule.reference_dataset()
    n = min(int(n), len(ds))
    device = next(model.parameters()).device
    conditional = int(getattr(model, "num_classes", 0)) > 0
    torch.manual_seed(seed)
    totals: dict = {"total_bpd": [], "prior_bpd": [], "decoder_bpd": []}
    for start in tqdm(range(0, n, batch_size), desc="bits/dim", disable=not progress, leave=False):
        items = [ds[i] for i in range(start, min(start + batch_size, n))]
        x = torch.stack([a for a, _ in items]).to(device)
        y = torch.as_tensor([int(b) for _, b in items], device=device) if conditional else None
        out = diffusion.calc_bpd_loop(lambda x_t, t, y_: model(x_t, t, y_), x, y=y, clip_x0=True, progress=False)
        for k, acc in totals.items():
            acc.append(out[k].double().cpu())
    res = {k: float(torch.cat(v).mean()) for k, v in totals.items()}
    return {"bpd": res["total_bpd"], "bpd_prior": res["prior_bpd"], "bpd_decoder": res["decoder_bpd"], "bpd_n": n,
            "bpd_conditional": conditional}


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by ``cfg`` (``configs/fid.yaml``); returns the JSON record."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from ddlab.checkpoint import load_checkpoint
    from ddlab.metrics import Evaluator, load_sample_labels, load_samples, save_samples_npz
    from ddlab.metrics.generate import balanced_labels, generate_uint8

    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    if cfg.ckpt is None and cfg.samples is None:
        raise ValueError("nothing to evaluate: give ckpt=path/to/last.ckpt (to sample) or samples=DIR_or_npz")
    if cfg.samples is None and int(cfg.n) < 2:
        raise ValueError(f"n={cfg.n}: FID needs at least 2 samples")
    if int(cfg.bpd.n) > 0 and cfg.ckpt is None:
        raise ValueError("bpd.n > 0 needs a model: give ckpt=...")
    device = _device(str(cfg.device))
    runtime.apply(**(cfg.get("runtime") or {}), device=device)
    out_dir = Path(cfg.paths.output_dir) if HydraConfig.initialized() else Path(cfg.output or "fid.json").parent
    record: dict[str, Any] = {"ckpt": str(cfg.ckpt) if cfg.ckpt else None}

    loaded = load_checkpoint(cfg.ckpt, use_ema=bool(cfg.use_ema), device=device) if cfg.ckpt else None
    run_cfg = loaded.config if loaded else None
    data_cfg = _data_config(cfg, run_cfg)
    datamodule = instantiate(data_cfg) if data_cfg is not None else None
    if datamodule is None and cfg.reference.stats is None:
        raise ValueError("samples= without ckpt= needs the data set: add data=<name> (e.g. data=mnist) or reference.stats=file.npz")

    evaluator = Evaluator(data_cfg, datamodule, cache_dir=cfg.fid.cache_dir, weights_path=cfg.fid.weights_path, device=device,
                          batch_size=int(cfg.fid.batch_size), stats_path=cfg.reference.stats, kid=bool(cfg.fid.kid),
                          isc=bool(cfg.fid.isc), prc=bool(cfg.fid.prc), kid_subsets=int(cfg.fid.kid_subsets),
                          kid_subset_size=int(cfg.fid.kid_subset_size), progress=bool(cfg.progress),
                          feature_extractor=str(cfg.fid.feature_extractor), classifier_path=cfg.fid.classifier_path)
    evaluator.reference()  # fail on missing data / weights before sampling for an hour

    t0 = time.perf_counter()
    if cfg.samples is not None:
        images = load_samples(cfg.samples)
        labels = load_sample_labels(cfg.samples)
        record["samples"] = str(cfg.samples)
    else:
        sampler, settings = _sampler(cfg, run_cfg)
        k = int(getattr(loaded.model, "num_classes", 0))
        labels = balanced_labels(int(cfg.n), k, torch.Generator().manual_seed(int(cfg.seed)))
        w = settings.get("guidance_scale", 1.0) if k else 1.0
        images = generate_uint8(loaded.model, loaded.diffusion, sampler, int(cfg.n), int(cfg.batch_size), labels=labels,
                                guidance_scale=w, seed=int(cfg.seed), progress=bool(cfg.progress))
        settings["guidance_scale"] = w
        record.update(sampler=settings, use_ema=bool(cfg.use_ema), global_step=loaded.global_step, seed=int(cfg.seed),
                      sampling_seconds=round(time.perf_counter() - t0, 2))
        if cfg.save_samples:
            out_dir.mkdir(parents=True, exist_ok=True)
            record["samples"] = str(save_samples_npz(out_dir / "samples.npz", images, labels.numpy() if labels is not None else None))
            _save_grid(images[:100], out_dir / "samples.png")
    if len(images) < 2:
        raise ValueError(f"{len(images)} sample(s): FID needs at least 2")
    record.update(evaluator.evaluate(images, labels=None if labels is None else np.asarray(labels)))
    if int(cfg.bpd.n) > 0:
        record.update(bits_per_dim(loaded.model, loaded.diffusion, datamodule, int(cfg.bpd.n), int(cfg.bpd.batch_size),
                                   seed=int(cfg.seed), progress=bool(cfg.progress)))
    record["data"] = data_cfg.get("_target_") if data_cfg else None
    record["feature_extractor"] = str(cfg.fid.feature_extractor)

    path = Path(cfg.output) if cfg.output else out_dir / "fid.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    keys = ("fid", "kid_mean", "is_mean", "precision", "recall", "class_accuracy", "class_entropy", "bpd")
    summary = "  ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)
    print(f"{summary}  (n={record['num_samples']}, reference {record['reference']['key']}) -> {path}")
    return record


def _save_grid(images: np.ndarray, path: Path) -> None:
    from torchvision.utils import save_image

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    save_image(x, path, nrow=math.ceil(math.sqrt(len(x))), padding=2)


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="fid")
def main(cfg: DictConfig) -> Any:
    evaluate(cfg)


if __name__ == "__main__":
    main()
