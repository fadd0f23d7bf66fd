"""`make bench-quality`: sample quality on a CPU budget, ddlab's MNIST recipe vs a tuned diffusers baseline.

Both systems train class-conditional MNIST models for the same wall-clock budget on the same machine
(training loop only: data in memory, set-up excluded), then draw ``--samples`` guided samples with
DDIM; every sample set is scored with the MNIST domain metric (:mod:`ddlab.metrics.classifier`):
FID/KID on the classifier's features against the test split, the classifier's accuracy w.r.t. the
requested labels, and the entropy of its predicted-class histogram.

* ddlab: ``python -m ddlab.train experiment=mnist_cfg`` (the ``make train`` recipe) with
  ``trainer.max_time`` set to the budget, sampled from the EMA weights with its configured sampler
  (``--ddlab-samplers`` adds samplers / step counts to compare).
* baseline: diffusers ``UNet2DModel`` + ``DDPMScheduler`` + ``EMAModel`` (warm-up power 2/3), AdamW
  with linear warm-up, labels dropped to a null class with p = 0.1, sampled with ``DDIMScheduler``
  and classifier-free guidance batched into one forward. ``--search`` first tunes its learning rate,
  batch size and width on a shorter budget (one factor at a time around the best known setting) and
  keeps the best by domain FID.

This is a measurement, not a test: it prints a markdown table and writes
``benchmarks/results/quality-<host>-<date>-<time>.json`` (next to its folder of sample grids), after each system.

    python -m benchmarks.quality --budget 600                 # the 10-minute comparison
    python -m benchmarks.quality --budget 1800 --search       # 30 minutes, baseline tuned first
    python -m benchmarks.quality --budget 600 --ddlab-samplers dpmpp_2m:10,ddim:20   # more ddlab samplers
    python -m benchmarks.quality --systems ddlab --ddlab-ckpt CKPT --ddlab-samplers dpmpp_2m:10:1,dpmpp_2m:10:2   # guidance scales
    python -m benchmarks.quality --systems baseline --baseline-ckpt DIR/baseline_ema.pt --baseline-samplers ddim:50:2
    python -m benchmarks.quality --systems ddlab --ddlab-ckpt run/checkpoints/last.ckpt   # score a checkpoint only
    python -m benchmarks.quality --budget 20 --samples 40 --quick   # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddlab.diffusion import GUIDANCE_BATCHING

from benchmarks.quality_baseline import (  # noqa: F401 (re-exported: the baseline used to live here)
    NULL_CLASS,
    _progress,
    baseline_model,
    mnist_28,
    sample_baseline,
    train_baseline,
)

ROOT = Path(__file__).resolve().parents[1]


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------- ddlab
def train_ddlab(budget: float, out: Path, threads: int, overrides: list[str]) -> dict:
    """``python -m ddlab.train experiment=mnist_cfg trainer.max_time=<budget>`` in a subprocess."""
    cmd = [sys.executable, "-m", "ddlab.train", "experiment=mnist_cfg", f"trainer.max_time={_hms(budget)}",
           f"hydra.run.dir={out}", f"torch_threads={threads}", "callbacks.sample_grid.every_n_steps=0",
           "trainer.enable_progress_bar=false", *overrides]
    _progress(f"ddlab: training for {budget:.0f} s: {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ddlab training failed:\n{proc.stderr[-3000:]}")
    import yaml

    metrics = json.loads((out / "metrics.json").read_text())
    batch = int(yaml.safe_load((out / ".hydra" / "config.yaml").read_text())["data"]["batch_size"])
    steps = int(metrics["global_step"])
    return {"ckpt": str(out / "checkpoints" / "last.ckpt"), "steps": steps, "batch_size": batch,
            "images_per_s": steps * batch / budget, "process_seconds": round(time.perf_counter() - t0, 1),
            "params": int(metrics.get("params/total", 0)), "overrides": overrides}


def sample_ddlab(ckpt: str, n: int, steps: int | None, guidance: float | None, seed: int, batch_size: int,
                 kind: str | None = None, guidance_batching: str = "auto",
                 options: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    from ddlab.checkpoint import load_checkpoint
    from ddlab.diffusion.samplers import SAMPLERS, sampler_config
    from ddlab.evaluation import balanced_labels, generate_uint8

    loaded = load_checkpoint(ckpt, use_ema=True)
    scfg = sampler_config(loaded.config["sampler"], kind)  # `kind` switches the sampler
    name = scfg.pop("_target_").rsplit(".", 1)[-1]
    scfg.pop("progress", None)
    if steps is not None:
        scfg.update(steps=steps, **({"step_size": None} if "step_size" in scfg else {}))
    if guidance is not None:
        scfg["guidance_scale"] = guidance
    scfg["guidance_batching"] = guidance_batching
    scfg.update(options or {})
    sampler = SAMPLERS[name](**scfg, progress=False)
    scfg = {"kind": name, **scfg}  # the record names the sampler
    labels = balanced_labels(n, loaded.model.num_classes, seed)
    t0 = time.perf_counter()
    images = generate_uint8(loaded.model, loaded.diffusion, sampler, n, batch_size, labels=labels, seed=seed, progress=True,
                            desc=f"ddlab {scfg['kind']}-{scfg['steps']}")
    return images, labels.numpy(), {"sampling_seconds": time.perf_counter() - t0, "sampler": scfg}


# ---------------------------------------------------------------------------------------------- scoring
class Scorer:
    """Domain FID/KID, class accuracy and entropy against the MNIST test split (mnist_cnn features)."""

    def __init__(self, data_dir: str, cache_dir: Path, classifier_path: str | None, reference_limit: int | None):
        from ddlab.data import MNISTDataModule
        from ddlab.metrics import Evaluator

        dm = MNISTDataModule(data_dir=data_dir, val_limit=reference_limit)
        data_cfg = {"_target_": "ddlab.data.MNISTDataModule", "image_size": 32, "resize": "pad", "channels": 1, "num_classes": 10}
        self.ev = Evaluator(data_cfg, dm, cache_dir=cache_dir, feature_extractor="mnist_cnn", classifier_path=classifier_path,
                            kid=True, isc=False, progress=False, kid_subsets=20, kid_subset_size=500)

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict:
        s = self.ev.evaluate(images, labels=labels)
        return {k: s[k] for k in ("fid", "kid_mean", "class_accuracy", "class_entropy", "num_samples")}


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 10) -> None:
    """``per_class`` samples of every class, one class per row."""
    from torchvision.utils import save_image

    rows = [images[labels == c][:per_class] for c in range(NULL_CLASS)]
    rows = [r for r in rows if len(r)]
    k = min(len(r) for r in rows)
    x = torch.from_numpy(np.concatenate([r[:k] for r in rows])).permute(0, 3, 1, 2).float() / 255.0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(x, path, nrow=k, padding=2)


# ---------------------------------------------------------------------------------------------- driver
def parse_sampler_spec(spec: str, option: str = "--ddlab-samplers") -> tuple[str | None, int, float | None]:
    """``steps``, ``kind:steps`` or ``kind:steps:guidance`` -> (kind, steps, guidance); None keeps the config's."""
    parts = spec.strip().split(":")
    try:
        if len(parts) == 1:
            return None, int(parts[0]), None
        if len(parts) == 2:
            return parts[0], int(parts[1]), None
        if len(parts) == 3:
            return parts[0], int(parts[1]), float(parts[2])
    except ValueError:
        pass
    raise SystemExit(f"{option}: cannot read {spec!r}; use steps, kind:steps or kind:steps:guidance "
                     "(e.g. 20, dpmpp_2m:10, dpmpp_2m:10:2)")


def parse_sampler_options(text: str) -> dict:
    """``--ddlab-sampler-args "key=value ..."`` -> a dict (values read as YAML: ``guidance_interval=[0.3,5]``)."""
    import yaml

    options = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--ddlab-sampler-args: cannot read {item!r}; use key=value, e.g. guidance_interval=[0.3,5]")
        options[key] = yaml.safe_load(value)
    return options


def _interval(sampler: dict) -> str:
    gi = sampler.get("guidance_interval")
    return "" if gi is None else f" in ({gi[0]:g}, {gi[1]:g}]"


def _markdown(result: dict) -> str:
    lines = [f"Budget {result['budget_s']:.0f} s per system, {result['samples']} guided samples each, "
             f"{result['machine']['cpu_threads']} torch threads on {result['machine']['host']} ({result['date']}).", "",
             "| system | params | images/s (train) | sampler | sampling s | domain FID | KID | class acc | class entropy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s = r["sampler"]
        lines.append(f"| {r['system']} | {r['params'] / 1e6:.2f} M | {r['images_per_s']:.0f} | {s['kind']}-{s['steps']} w={s['guidance_scale']}{_interval(s)} "
                     f"| {r['sampling_seconds']:.1f} | {r['fid']:.3f} | {r['kid_mean']:.4f} | {r['class_accuracy']:.3f} | {r['class_entropy']:.3f} |")
    if result.get("search"):
        lines += ["", f"Baseline search ({result['search_budget_s']:.0f} s each, {result['search_samples']} samples, DDIM-{result['search_steps']}):", "",
                  "| lr | batch | width | steps | domain FID | class acc |", "|---|---|---|---|---|---|"]
        for r in result["search"]:
            st = r["settings"]
            lines.append(f"| {st['lr']:g} | {st['batch_size']} | {'-'.join(map(str, st['width']))} | {r['steps']} | {r['fid']:.3f} | {r['class_accuracy']:.3f} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=600, help="training seconds per system (default 600)")
    p.add_argument("--samples", type=int, default=500, help="guided samples per system")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--systems", default="ddlab,baseline")
    p.add_argument("--ddlab-samplers", default="", help="extra ddlab samplers to score: [kind:]steps[:guidance], e.g. dpmpp_2m:10,ddim:20,dpmpp_2m:10:2")
    p.add_argument("--ddlab-sampler-args", default="",
                   help="sampler options for every ddlab sampler scored (space separated key=value), "
                        "e.g. \"guidance_interval=[0.3,5] clip_x0=false\"")
    p.add_argument("--sample-batch", type=int, default=64,
                   help="sampling batch (ddlab.sample's default; 500 guided samples took 16.8-18.8 s at 64 against 19.2-21.1 s at 100)")
    p.add_argument("--ddlab-args", default="", help="extra Hydra overrides for the ddlab run (space separated)")
    p.add_argument("--ddlab-ckpt", default=None, help="score this checkpoint instead of training ddlab")
    p.add_argument("--baseline-steps", type=int, default=50, help="DDIM steps of the baseline")
    p.add_argument("--guidance", type=float, default=1.25,
                   help="guidance scale of the baseline, also in --search (ddlab uses its config's). 1.25 was the baseline's best "
                        "of 1/1.25/1.5/2/3 at 10 and 30 minutes (experiments/mnist_quality)")
    p.add_argument("--guidance-batching", default="auto", choices=GUIDANCE_BATCHING,
                   help="how ddlab runs the guided passes: one forward of twice the batch, two forwards, or auto (split on CPU)")
    p.add_argument("--baseline-ckpt", default=None, help="re-score this baseline_ema.pt (written by an earlier run) instead of training")
    p.add_argument("--baseline-samplers", default="", help="extra baseline DDIM settings to score: steps or ddim:steps:guidance")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", default="32,64,64")
    p.add_argument("--search", action="store_true", help="tune the baseline's lr, batch size and width first")
    p.add_argument("--search-budget", type=float, default=None, help="seconds per search run (default budget / 4)")
    p.add_argument("--search-samples", type=int, default=200)
    p.add_argument("--search-steps", type=int, default=20)
    p.add_argument("--reference-limit", type=int, default=None, help="test images for the reference statistics (default all 10k)")
    p.add_argument("--classifier", default=None, help="mnist_cnn weights (default $DDLAB_MNIST_CNN or logs/classifiers/mnist_cnn.pt; trained if absent)")
    p.add_argument("--data-dir", default=os.environ.get("DDLAB_DATA_DIR", "data"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny classifier and ddlab model, few steps")
    return p


def _sampler_specs(args) -> tuple[list, list]:
    """The extra ddlab samplers and the baseline's (steps, guidance) settings, read before any training
    so a typo fails in a second, not after the budget."""
    ddlab_specs = [parse_sampler_spec(spec) for spec in args.ddlab_samplers.split(",") if spec]
    parse_sampler_options(args.ddlab_sampler_args)
    baseline_specs = [(args.baseline_steps, args.guidance)]
    for kind, steps, g in (parse_sampler_spec(spec, "--baseline-samplers") for spec in args.baseline_samplers.split(",") if spec):
        if kind not in (None, "ddim"):
            raise SystemExit(f"--baseline-samplers: the baseline samples with ddim, not {kind!r}")
        baseline_specs.append((steps, args.guidance if g is None else g))
    baseline_specs = list(dict.fromkeys(baseline_specs))  # the default setting listed again is scored once
    return ddlab_specs, baseline_specs


def _make_scorer(args, work: Path) -> tuple[Scorer, Path]:
    """The domain scorer, training the MNIST classifier first when it is missing."""
    from ddlab.metrics.classifier import default_path, train_classifier

    cls_path = Path(args.classifier) if args.classifier else default_path()
    if args.quick and not args.classifier:
        cls_path = work / "mnist_cnn.pt"
    if not cls_path.is_file():
        _progress(f"no classifier at {cls_path}: training it")
        kw = {"epochs": 1, "limit": 2000, "test_limit": 500} if args.quick else {}
        train_classifier(args.data_dir, cls_path, progress=False, **kw)
    scorer = Scorer(args.data_dir, work / "fid_stats" if args.quick else ROOT / "logs" / "fid_stats", str(cls_path),
                    500 if args.quick else args.reference_limit)
    return scorer, cls_path


def _run_ddlab(args, ddlab_specs: list, scorer: Scorer, work: Path, result: dict, write) -> None:
    """Train (or load) the ddlab model, then score its configured sampler and every extra one."""
    extra = args.ddlab_args.split()
    if args.quick:
        extra += ["model.base_channels=8", "model.channel_mult=[1,2]", "scheduler.num_timesteps=50", "sampler.steps=4",
                  "data.limit=256", "trainer.limit_val_batches=0", "callbacks.sample_grid.n=10"]
    if args.ddlab_ckpt:
        info = {"ckpt": args.ddlab_ckpt, "images_per_s": float("nan"), "params": 0, "steps": None}
        run_metrics = Path(args.ddlab_ckpt).resolve().parents[1] / "metrics.json"  # <run>/checkpoints/last.ckpt
        if run_metrics.is_file():
            m = json.loads(run_metrics.read_text())
            info.update(images_per_s=float(m.get("train/images_per_sec", float("nan"))), params=int(m.get("params/total", 0)),
                        steps=m.get("global_step"))
    else:
        info = train_ddlab(args.budget, work / "ddlab", args.threads, extra)
    for kind, steps, guidance in [(None, None, None), *ddlab_specs]:
        images, labels, smp = sample_ddlab(info["ckpt"], args.samples, steps, guidance, seed=1, batch_size=args.sample_batch,
                                           kind=kind, guidance_batching=args.guidance_batching,
                                           options=parse_sampler_options(args.ddlab_sampler_args))
        row = {"system": "ddlab", **{k: v for k, v in info.items() if k != "ckpt"}, **smp, **scorer(images, labels)}
        sc = smp["sampler"]
        save_grid(images, labels, work / f"ddlab_{sc['kind']}{sc['steps']}_w{sc['guidance_scale']:g}.png")
        result["rows"].append(row)
        _progress(f"ddlab: {row['sampler']['kind']}-{row['sampler']['steps']}: FID {row['fid']:.3f}, acc {row['class_accuracy']:.3f}, "
                  f"{row['sampling_seconds']:.1f} s")
        write()


def _search_baseline(args, width: tuple, best: dict, scorer: Scorer, result: dict, write) -> dict:
    """One factor at a time around ``best`` on a shorter budget; returns the settings with the lowest FID."""
    sb = args.search_budget or args.budget / 4
    candidates = [best, {**best, "lr": best["lr"] / 2}, {**best, "lr": best["lr"] * 2},
                  {**best, "batch_size": best["batch_size"] // 2}, {**best, "batch_size": best["batch_size"] * 2},
                  {**best, "width": tuple(w * 3 // 4 for w in width)}, {**best, "width": tuple(w * 3 // 2 for w in width)}]
    result.update(search=[], search_budget_s=sb, search_samples=args.search_samples, search_steps=args.search_steps)
    for c in candidates:
        tr = train_baseline(sb, args.data_dir, **c)
        images, labels, _ = sample_baseline(tr["model"], tr["scheduler_config"], args.search_samples, args.search_steps,
                                            args.guidance, seed=1, batch_size=args.sample_batch)
        sc = scorer(images, labels)
        result["search"].append({"settings": tr["settings"], "steps": tr["steps"], **sc})
        _progress(f"search {tr['settings']}: FID {sc['fid']:.3f}, acc {sc['class_accuracy']:.3f}")
        write()
    top = min(result["search"], key=lambda r: r["fid"])["settings"]
    return {"lr": top["lr"], "batch_size": top["batch_size"], "width": tuple(top["width"])}


def _load_or_train_baseline(args, best: dict, work: Path) -> dict:
    """The saved baseline of ``--baseline-ckpt``, or a freshly trained one (saved to ``work``)."""
    if args.baseline_ckpt:  # re-score a saved baseline (its baseline_ema.pt) instead of training one
        tr = torch.load(args.baseline_ckpt, map_location="cpu", weights_only=False)
        tr["model"] = baseline_model(tuple(tr["settings"]["width"]))
        tr["model"].load_state_dict(tr.pop("ema_state_dict"))
        tr["model"].eval()
    else:
        tr = train_baseline(args.budget, args.data_dir, **best)
        torch.save({"ema_state_dict": tr["model"].state_dict(), **{k: v for k, v in tr.items() if k != "model"}},
                   work / "baseline_ema.pt")  # to look at, or re-score with --baseline-ckpt
    return tr


def _run_baseline(args, baseline_specs: list, scorer: Scorer, work: Path, result: dict, write) -> None:
    """Tune (``--search``), train or load the diffusers baseline, then score each of its DDIM settings."""
    width = tuple(int(w) for w in args.width.split(","))
    best = {"lr": args.lr, "batch_size": args.batch_size, "width": width}
    if args.search:
        best = _search_baseline(args, width, best, scorer, result, write)
    tr = _load_or_train_baseline(args, best, work)
    for i, (steps, guidance) in enumerate(baseline_specs):
        images, labels, smp = sample_baseline(tr["model"], tr["scheduler_config"], args.samples, steps, guidance,
                                              seed=1, batch_size=args.sample_batch)
        row = {"system": "diffusers baseline", **{k: v for k, v in tr.items() if k not in ("model", "scheduler_config")},
               **smp, **scorer(images, labels)}
        save_grid(images, labels, work / ("baseline.png" if i == 0 else f"baseline_ddim{steps}_w{guidance:g}.png"))
        result["rows"].append(row)
        _progress(f"baseline ddim-{steps} w={guidance:g}: FID {row['fid']:.3f}, acc {row['class_accuracy']:.3f}, "
                  f"{row['sampling_seconds']:.1f} s")
        write()


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    ddlab_specs, baseline_specs = _sampler_specs(args)
    if args.baseline_ckpt and args.search:
        raise SystemExit("--baseline-ckpt re-scores a trained baseline; it cannot be combined with --search")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DDLAB_DATA_DIR", args.data_dir)
    started = _dt.datetime.now()
    out_dir = Path(args.out)
    work = out_dir / f"quality-{socket.gethostname()}-{started:%Y%m%d-%H%M%S}"
    work.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{work.name}.json"  # one file per run: a second run on the same day keeps the first

    scorer, cls_path = _make_scorer(args, work)
    result = {"date": f"{started:%Y-%m-%d %H:%M}", "budget_s": args.budget, "samples": args.samples, "rows": [],
              "machine": {"host": socket.gethostname(), "cpu_threads": args.threads, "torch": torch.__version__},
              "classifier": str(cls_path), "command": " ".join(sys.argv)}

    def write():
        json_path.write_text(json.dumps(result, indent=2, default=str))

    systems = args.systems.split(",")
    if "ddlab" in systems:
        _run_ddlab(args, ddlab_specs, scorer, work, result, write)
    if "baseline" in systems:
        _run_baseline(args, baseline_specs, scorer, work, result, write)

    result["markdown"] = _markdown(result)
    result["grids"] = str(work)
    write()
    print(result["markdown"])
    print(f"\n-> {json_path} (grids in {work})")
    return result


if __name__ == "__main__":
    main()
