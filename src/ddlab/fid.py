"""Sample-quality evaluation: ``python -m ddlab.fid ckpt=PATH n=... [sampler.steps=...]`` (Hydra).

Samples with the checkpoint's EMA weights and its sampler and guidance (``sampler.*`` overrides
keys, ``sampler=<name>`` picks another), with the same seeding rules as ``ddlab.sample`` (see
:mod:`ddlab.evaluation`), or reads existing samples (``samples=DIR_or_npz``), and writes to ``out``:
``fid.json`` (FID, KID, Inception Score, precision/recall when ``fid.prc=true``, bits/dim when
``bpd.n > 0``, the sampler settings, the number of samples and the reference statistics used),
``samples.npz`` and ``grid.png``. Every input is checked before any compute.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ddlab import config as _config  # noqa: F401  (registers resolvers)
from ddlab import evaluation as ev

log = logging.getLogger("ddlab.fid")


def _check_args(cfg: DictConfig) -> None:
    model = ev.model_source(cfg.get("ckpt"), cfg.get("pretrained"), required=False)
    if model is None and cfg.samples is None:
        raise ValueError("nothing to evaluate: give ckpt=path/to/last.ckpt or pretrained=DIR_or_repo (to sample), "
                         "or samples=DIR_or_npz")
    if cfg.samples is None and int(cfg.n) < 2:
        raise ValueError(f"n={cfg.n}: FID needs at least 2 samples")
    if int(cfg.bpd.n) > 0 and model is None:
        raise ValueError("bpd.n > 0 needs a model: give ckpt=... or pretrained=...")


def _inputs(cfg: DictConfig, device) -> dict:
    """Read and check every input (samples, checkpoint, data config, sizes) before any compute."""
    from hydra.utils import instantiate

    from ddlab.metrics import load_sample_labels, load_samples
    from ddlab.metrics.samples import check_sample_size

    _check_args(cfg)
    inp: dict[str, Any] = {"images": None, "labels": None}
    has_model = ev.model_source(cfg.get("ckpt"), cfg.get("pretrained"), required=False) is not None
    inp["loaded"] = ev.load_model(cfg.get("ckpt"), cfg.get("pretrained"), bool(cfg.ema), device) if has_model else None
    run_cfg = inp["loaded"].config if inp["loaded"] else None
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else None
    inp["data_cfg"] = ev.data_config(data, run_cfg, cfg.reference.data_dir, cfg.reference.limit)
    if inp["data_cfg"] is None and cfg.reference.stats is None:
        raise ValueError("samples= without ckpt= needs the data set: add data=<name> (e.g. data=mnist) or reference.stats=file.npz")
    if cfg.samples is not None:
        inp["images"], inp["labels"] = load_samples(cfg.samples), load_sample_labels(cfg.samples)
        if len(inp["images"]) < 2:
            raise ValueError(f"samples={cfg.samples}: {len(inp['images'])} image(s); FID needs at least 2")
    inp["datamodule"] = instantiate(inp["data_cfg"]) if inp["data_cfg"] is not None else None
    if inp["images"] is not None:
        shape, key = inp["images"].shape[1:], f"samples={cfg.samples}"
    else:
        m = inp["loaded"].model
        shape, key = (m.image_size, m.image_size, m.in_channels), ev.model_source(cfg.get("ckpt"), cfg.get("pretrained"))
        inp["sampler"] = ev.run_sampler(run_cfg.get("sampler"), OmegaConf.to_container(cfg.sampler, resolve=True),
                                        int(getattr(m, "num_classes", 0)))
    d = inp["data_cfg"] or {}
    inp["resize"] = False
    if "image_size" in d and "channels" in d:
        inp["resize"] = check_sample_size(shape, (d["image_size"], d["channels"]), key, bool(cfg.resize))
    return inp


def _evaluator(cfg: DictConfig, inp: dict, device):
    from ddlab.metrics import Evaluator

    f = cfg.fid
    return Evaluator(inp["data_cfg"], inp["datamodule"], cache_dir=f.cache_dir, weights_path=f.weights_path, device=device,
                     batch_size=int(f.batch_size), stats_path=cfg.reference.stats, kid=bool(f.kid), isc=bool(f.isc),
                     prc=bool(f.prc), kid_subsets=int(f.kid_subsets), kid_subset_size=int(f.kid_subset_size),
                     progress=bool(cfg.progress), feature_extractor=str(f.feature_extractor), classifier_path=f.classifier_path)


def _generate(cfg: DictConfig, inp: dict, record: dict, out_dir: Path) -> None:
    loaded, (sampler, scfg, w) = inp["loaded"], inp["sampler"]
    n, seed = int(cfg.n), int(cfg.seed)
    labels = ev.make_labels(None, n, int(getattr(loaded.model, "num_classes", 0)), seed)
    settings = ev.describe_sampler(sampler, scfg, w, loaded.diffusion)
    log.info("sampling %d images with %s (%s steps, guidance %.3g)", n, settings["name"], settings["steps"], w)
    t0 = time.perf_counter()
    inp["images"] = ev.generate_uint8(loaded.model, loaded.diffusion, sampler, n, int(cfg.batch_size), labels=labels,
                                      guidance_scale=w, seed=seed, progress=bool(cfg.progress))
    inp["labels"] = None if labels is None else labels.numpy()
    record.update(sampler=settings, ema=bool(cfg.ema), global_step=loaded.global_step, seed=seed,
                  sampling_seconds=round(time.perf_counter() - t0, 2))
    if cfg.save_samples:
        files = ev.save_samples(out_dir, inp["images"], labels, grid_limit=100)
        record["samples"] = str(files["npz"])


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by ``cfg`` (``configs/fid.yaml``); returns the JSON record."""
    from ddlab.metrics.samples import resize_uint8

    device = ev.setup_runtime(str(cfg.device), cfg.get("torch_threads"), cfg.get("runtime"))
    inp = _inputs(cfg, device)
    out_dir = Path(cfg.out)
    record: dict[str, Any] = {"ckpt": str(cfg.ckpt) if cfg.ckpt else None, "pretrained": cfg.get("pretrained")}
    evaluator = _evaluator(cfg, inp, device)
    evaluator.reference()  # fail on missing data / weights before sampling for an hour
    if inp["images"] is None:
        _generate(cfg, inp, record, out_dir)
    else:
        record["samples"] = str(cfg.samples)
    images = inp["images"]
    if inp["resize"]:
        record["resized_from"] = list(images.shape[1:3])
        images = resize_uint8(images, int(inp["data_cfg"]["image_size"]))
    record.update(evaluator.evaluate(images, labels=inp["labels"]))
    if int(cfg.bpd.n) > 0:
        loaded, ds = inp["loaded"], inp["datamodule"].reference_dataset()
        terms = ev.bits_per_dim(loaded.model, loaded.diffusion, ds, range(min(int(cfg.bpd.n), len(ds))), int(cfg.bpd.batch_size),
                                seed=int(cfg.seed), progress=bool(cfg.progress))
        record.update(ev.summarize_bpd(terms), bpd_conditional=int(getattr(loaded.model, "num_classes", 0)) > 0)
    record["data"] = inp["data_cfg"].get("_target_") if inp["data_cfg"] else None
    record["feature_extractor"] = str(cfg.fid.feature_extractor)
    return _write(record, out_dir)


def _write(record: dict, out_dir: Path) -> dict:
    path = out_dir / "fid.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    keys = ("fid", "kid_mean", "is_mean", "precision", "recall", "class_accuracy", "class_entropy", "bpd")
    summary = "  ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)
    print(f"{summary}  (n={record['num_samples']}, reference {record['reference']['key']}) -> {path}")
    return record


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="fid")
def main(cfg: DictConfig) -> Any:
    evaluate(cfg)


if __name__ == "__main__":
    main()
