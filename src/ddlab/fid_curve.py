"""Quality against network evaluations: ``python -m ddlab.fid_curve ckpt=PATH samplers=[...] steps=[...]``.

Draws the same ``n`` labels and start noises (the seeding rules of :mod:`ddlab.evaluation`) with
every sampler in ``samplers`` at every step count in ``steps``, scores each point as ``ddlab.fid``
does (the fid config's ``fid:`` / ``reference:`` settings; with ``fid.feature_extractor=mnist_cnn``
also class accuracy) and writes to ``out``: ``curve.json`` (every point; rewritten after each one),
``curve.md`` (sampler, steps, NFE, FID, accuracy, seconds) and ``curve.png`` (FID against NFE,
log-x, one line per sampler; a second panel for accuracy). NFE is network forwards per image,
guidance's extra forward counted. Every sampler and step count is checked before anything is drawn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from ddlab import config as _config  # noqa: F401  (registers resolvers)
from ddlab import evaluation as ev

log = logging.getLogger("ddlab.fid_curve")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


def check_args(cfg: DictConfig) -> tuple[list[str], list[int]]:
    """The sampler names and step counts of ``cfg``, refused with the valid choices when wrong."""
    if cfg.ckpt is None:
        raise ValueError("give ckpt=path/to/last.ckpt: the curve samples from a checkpoint")
    if cfg.get("samples") is not None:
        raise ValueError("samples=: ddlab.fid_curve draws its own samples at every point; drop samples= (ddlab.fid scores existing ones)")
    if int(cfg.n) < 2:
        raise ValueError(f"n={cfg.n}: FID needs at least 2 samples per point")
    over = cfg.get("sampler") or {}
    if "_target_" in over:
        raise ValueError("sampler=<name>: the curve's samplers are listed with samplers=[a,b,...], not sampler=")
    if over.get("steps") is not None:
        raise ValueError("sampler.steps: the curve's step counts are listed with steps=[5,10,...], not sampler.steps")
    names, steps = [str(s) for s in _as_list(cfg.samplers)], _as_list(cfg.steps)
    valid = ev.sampler_names()
    unknown = [s for s in names if s not in valid]
    if not names or unknown:
        raise ValueError(f"samplers: unknown sampler(s) {unknown or names}; choose from {', '.join(valid)}")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if not steps or bad:
        raise ValueError(f"steps: every step count must be an integer >= 1, got {bad or steps}")
    if len(set(names)) < len(names) or len(set(steps)) < len(steps):
        raise ValueError(f"samplers={names} / steps={steps}: each name and step count once")
    return names, [int(s) for s in steps]


def plan(cfg: DictConfig, loaded, names: list[str], steps: list[int]) -> list[dict]:
    """One built sampler per (sampler, steps) point, with its guidance weight and NFE; any point that
    cannot run on this checkpoint's formulation is refused here, before anything is drawn."""
    stored = loaded.config.get("sampler") if loaded.config is not None else None
    over = {k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items() if v is not None}
    k = int(getattr(loaded.model, "num_classes", 0))
    points = []
    for name in names:
        for s in steps:
            try:
                scfg = ev.named_sampler_config(stored, name, {**over, "steps": s})
                sampler = ev.build_sampler(scfg, progress=False)
                w = ev.resolve_guidance(sampler, k, overridden="guidance_scale" in over)
                nfe = ev.sampler_nfe(sampler, k > 0 and w != 1.0, loaded.diffusion)
            except (ValueError, InstantiationException) as e:
                cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
                raise ValueError(f"samplers={name}, steps={s}: {cause}") from None
            points.append({"sampler": name, "steps": s, "nfe": nfe, "guidance_scale": w, "_obj": sampler, "_cfg": scfg})
    return points


def _labels_digest(labels) -> str | None:
    return None if labels is None else hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16]


def _score_point(cfg: DictConfig, inp: dict, evaluator, p: dict, labels, out_dir: Path) -> tuple[dict, dict]:
    from ddlab.metrics.samples import resize_uint8

    loaded, n, seed = inp["loaded"], int(cfg.n), int(cfg.seed)
    t0 = time.perf_counter()
    images = ev.generate_uint8(loaded.model, loaded.diffusion, p["_obj"], n, int(cfg.batch_size), labels=labels,
                               guidance_scale=p["guidance_scale"], seed=seed, progress=bool(cfg.progress),
                               desc=f"{p['sampler']} {p['steps']} steps")
    seconds = time.perf_counter() - t0
    if cfg.save_samples:
        ev.save_samples(out_dir / "points" / f"{p['sampler']}_{p['steps']}", images, labels, grid_limit=100)
    if inp["resize"]:
        images = resize_uint8(images, int(inp["data_cfg"]["image_size"]))
    scores = evaluator.evaluate(images, labels=None if labels is None else labels.numpy())
    row = {key: v for key, v in p.items() if not key.startswith("_")}
    row.update(seconds=round(seconds, 2), fid=float(scores["fid"]), settings=ev.describe_sampler(p["_obj"], p["_cfg"], p["guidance_scale"]))
    for key in ("class_accuracy", "class_entropy", "kid_mean", "is_mean"):
        if key in scores:
            row[key] = float(scores[key])
    return row, scores


def _without_sampler_overrides(cfg: DictConfig) -> DictConfig:
    out = cfg.copy()
    out.sampler = OmegaConf.create({"steps": None, "guidance_scale": None, "guidance_batching": None})
    return out


def curve(cfg: DictConfig) -> dict:
    """Run the curve described by ``cfg`` (``configs/fid_curve.yaml``); returns the JSON record."""
    from ddlab.fid import _evaluator, _inputs

    names, steps = check_args(cfg)
    device = ev.setup_runtime(str(cfg.device), cfg.get("torch_threads"), cfg.get("runtime"))
    inp = _inputs(_without_sampler_overrides(cfg), device)  # the overrides are checked per point in plan()
    points = plan(cfg, inp["loaded"], names, steps)
    evaluator = _evaluator(cfg, inp, device)
    evaluator.reference()  # missing data / weights fail before the first point is drawn
    loaded, out_dir = inp["loaded"], Path(cfg.out)
    labels = ev.make_labels(None, int(cfg.n), int(getattr(loaded.model, "num_classes", 0)), int(cfg.seed))
    record: dict[str, Any] = {"ckpt": str(cfg.ckpt), "global_step": loaded.global_step, "n": int(cfg.n), "seed": int(cfg.seed),
                              "batch_size": int(cfg.batch_size), "ema": bool(cfg.ema), "labels_sha256": _labels_digest(labels),
                              "feature_extractor": str(cfg.fid.feature_extractor), "points": []}
    for i, p in enumerate(points, 1):
        print(f"[{i}/{len(points)}] {p['sampler']} steps={p['steps']} NFE={p['nfe']} (guidance {p['guidance_scale']:g}): "
              f"{cfg.n} images", flush=True)
        row, scores = _score_point(cfg, inp, evaluator, p, labels, out_dir)
        record["reference"] = scores.get("reference")
        record["points"].append(row)
        acc = f"  accuracy={row['class_accuracy']:.4f}" if "class_accuracy" in row else ""
        print(f"[{i}/{len(points)}] {p['sampler']} steps={p['steps']}: FID={row['fid']:.3f}{acc}  ({row['seconds']:.1f} s sampling)",
              flush=True)
        write_json(record, out_dir)
    write_outputs(record, out_dir)
    return record


def write_json(record: dict, out_dir: Path) -> Path:
    from ddlab.io import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "curve.json"
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, default=str))
    return path


def table(points: list[dict]) -> str:
    """The markdown table of the points: sampler, steps, NFE (guidance counted), FID, accuracy, seconds."""
    lines = ["| sampler | steps | NFE | FID | accuracy | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for p in points:
        acc = f"{p['class_accuracy']:.3f}" if "class_accuracy" in p else "-"
        lines.append(f"| {p['sampler']} | {p['steps']} | {p['nfe']} | {p['fid']:.2f} | {acc} | {p['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def write_outputs(record: dict, out_dir: Path) -> dict:
    """``curve.json``, ``curve.md`` and ``curve.png`` of a finished record, in ``out_dir``."""
    from ddlab.fid_curve_plot import plot_curve

    paths = {"json": write_json(record, out_dir), "md": out_dir / "curve.md", "png": out_dir / "curve.png"}
    head = (f"FID ({record['feature_extractor']} features) against network forwards per image, n={record['n']} samples per point, "
            f"seed {record['seed']}, checkpoint {record['ckpt']} (step {record['global_step']}).\n\n")
    paths["md"].write_text(head + table(record["points"]))
    plot_curve(record["points"], paths["png"], title=f"{Path(record['ckpt']).name}, n={record['n']}, {record['feature_extractor']}")
    print(f"{len(record['points'])} points -> {paths['json']}, {paths['md'].name}, {paths['png'].name}")
    return paths


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="fid_curve")
def main(cfg: DictConfig) -> Any:
    curve(cfg)


if __name__ == "__main__":
    main()
