"""``make bench`` / ``python -m benchmarks.run [--quick] [--device cpu|cuda] [--out DIR]``.

Measures, side by side in one process (never asserts a speed):

* training throughput and peak memory per model preset (``configs/model/*.yaml``) at 32 and 64 px:
  a real ``lightning.pytorch.Trainer`` fitting ``ddlab.training.DiffusionModule`` versus a bare
  PyTorch loop doing the same work (same model and initial weights, label dropout, timestep
  sampler, ``GaussianDiffusion.training_losses``, AdamW + LR schedule, precision, batch, gradient
  clipping and EMA update), alternated repeat by repeat to cancel drift;
* sampling throughput (DDIM and DDPM, with and without classifier-free guidance) of
  ``ddlab.diffusion.Sampler`` versus a loop over diffusers' ``DDIMScheduler`` / ``DDPMScheduler``
  calling the same network the same way;
* data loading: images/s each DataModule (``configs/data/*.yaml``) delivers with its configured
  workers versus images/s the ddlab training step consumes at that data set's shape and batch;
* scaling: time per training step as batch and image size grow; on CUDA also channels_last, bf16,
  ``torch.compile`` and the SDPA attention backends.

Writes ``<out>/<host>-<date>.json`` (default ``benchmarks/results``) and prints markdown tables.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth of the resident set
(``ru_maxrss`` minus the RSS just before the first step) of a fresh subprocess running the case.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import logging
import os
import warnings
from pathlib import Path

import torch

from benchmarks import data as data_section
from benchmarks import sampling as sampling_section
from benchmarks import scaling as scaling_section
from benchmarks import train as train_section
from benchmarks.common import ROOT, cell, machine_info, preset_names, progress, table
from benchmarks.data import bench_data
from benchmarks.sampling import bench_sampling, diffusers_loop  # noqa: F401  (re-exported for other scripts)
from benchmarks.scaling import bench_scaling
from benchmarks.train import DEFAULT_MODEL, Case, bench_train, memory_case, run_bare, run_lightning, throughput  # noqa: F401

SCHEMA = "ddlab-bench/1"
_progress = progress


# ====================================================================== settings
def settings_for(args) -> dict:
    """Sizes per device and mode. CPU sizes are kept modest (2 shared cores); CUDA runs full presets."""
    cuda = args.device == "cuda"
    if args.quick:
        s = dict(sizes=[16], train_batch=4, steps=2, warmup=1, repeats=2, base_channels=4, presets=[DEFAULT_MODEL],
                 sample_batch=8, ddim_steps=4, ddpm_steps=4, sample_base_channels=4, guidance_scale=2.0,
                 data_batches=3, data_limit=256, scale_batches=[2, 4], scale_sizes=[16, 32], scale_batch=2)
    elif cuda:
        s = dict(sizes=[32, 64], train_batch=64, steps=20, warmup=5, repeats=5, base_channels=None, presets=None,
                 sample_batch=64, ddim_steps=50, ddpm_steps=1000, sample_base_channels=None, guidance_scale=2.0,
                 data_batches=50, data_limit=None, scale_batches=[8, 16, 32, 64, 128, 256], scale_sizes=[32, 64, 128], scale_batch=32)
    else:
        s = dict(sizes=[32, 64], train_batch=8, steps=5, warmup=2, repeats=3, base_channels=8, presets=None,
                 sample_batch=64, ddim_steps=50, ddpm_steps=100, sample_base_channels=8, guidance_scale=2.0,
                 data_batches=20, data_limit=None, scale_batches=[2, 4, 8, 16], scale_sizes=[16, 32, 64], scale_batch=4)
    for key in ("repeats", "steps", "warmup", "train_batch", "sample_batch", "ddim_steps", "ddpm_steps"):
        v = getattr(args, key, None)
        if v is not None:
            s[key] = v
    s["sample_repeats"] = getattr(args, "sample_repeats", None) or s["repeats"]
    if args.base_channels is not None:
        s["base_channels"] = None if args.base_channels <= 0 else args.base_channels
        s["sample_base_channels"] = s["base_channels"]
    if args.presets:
        s["presets"] = args.presets.split(",")
    if args.sizes:
        s["sizes"] = [int(v) for v in args.sizes.split(",")]
    if s["presets"] is None:
        s["presets"] = preset_names()
    return s


# ====================================================================== presets (issue 4's per-preset measurement)
def bench_presets(s: dict, notes: list):
    try:
        from benchmarks.presets import run_presets
    except ImportError as e:
        notes.append(f"presets: benchmarks/presets.py (run_presets) is not available yet ({e}); skipped")
        return None
    _progress("presets: benchmarks.presets.run_presets(image_size=32, batch_size=8)")
    try:
        return run_presets(image_size=32, batch_size=8, repeats=s["repeats"])
    except Exception as e:  # noqa: BLE001  (reported in the notes, not fatal)
        notes.append(f"presets: run_presets failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return None


# ====================================================================== report
def markdown(result: dict) -> str:
    m, st = result["machine"], result["settings"]
    lines = [(f"Machine: `{m['host']}`, {m['processor']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), "
              f"torch {m['torch']}, lightning {m['lightning']}, device {m['device']}. "
              f"Median [min-max] of {st['repeats']} repeats after warm-up."), ""]
    if result["train"]:
        lines += train_section.markdown(result["train"], st, m["device"])
    if result["sampling"]:
        lines += sampling_section.markdown(result["sampling"], st)
    if result["data"]:
        lines += data_section.markdown(result["data"])
    if result["scaling"]:
        lines += scaling_section.markdown(result["scaling"])
    if isinstance(result.get("presets"), list) and result["presets"]:
        keys = list(result["presets"][0].keys())
        lines += table("**Presets** (`benchmarks.presets.run_presets`)", keys, [[cell(r.get(k)) for k in keys] for r in result["presets"]])
    if result["notes"]:
        lines += ["Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def _quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")
    shared_mnist = ROOT.parent / "shared" / "data" / "MNIST" / "raw"
    if "DDLAB_DATA_DIR" not in os.environ and shared_mnist.is_dir():
        os.environ["DDLAB_DATA_DIR"] = str(shared_mnist)


def _finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return True


SECTIONS = ("train", "sampling", "data", "scaling", "presets")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds per section (smoke run)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when present, else cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for <host>-<date>.json")
    p.add_argument("--only", default=None, help=f"comma list of sections to run ({','.join(SECTIONS)})")
    p.add_argument("--skip", default="", help="comma list of sections to skip")
    p.add_argument("--presets", default=None, help="comma list of model presets (default: every configs/model/*.yaml)")
    p.add_argument("--sizes", default=None, help="comma list of image sizes for the training table")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed training steps per repeat")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps per repeat")
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--sample-batch", type=int, default=None)
    p.add_argument("--sample-repeats", type=int, default=None, help="repeats of each sampling run (default --repeats; a DDPM-1000 run is long)")
    p.add_argument("--ddim-steps", type=int, default=None)
    p.add_argument("--ddpm-steps", type=int, default=None)
    p.add_argument("--base-channels", type=int, default=None, help="model.base_channels override (0: the presets' own)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the per-case memory subprocesses")
    p.add_argument("--note", default=None, help="free text stored with the result (e.g. 'machine shared with other jobs')")
    p.add_argument("--memcase", default=None, help=argparse.SUPPRESS)
    return p


def _run_sections(sections: set, s: dict, dev: torch.device, args, result: dict, save) -> None:
    """Each section in turn, saving the JSON after each so an interrupted run keeps what it measured."""
    notes = result["notes"]
    runs = {"train": lambda: bench_train(s, dev, memory=not args.no_memory, notes=notes),
            "sampling": lambda: bench_sampling(s, dev, notes), "data": lambda: bench_data(s, dev, notes),
            "scaling": lambda: bench_scaling(s, dev, notes)}
    for name, run in runs.items():
        if name in sections:
            result[name] = run()
            save()
    if "presets" in sections:
        if args.quick:
            notes.append("presets: run_presets is not called under --quick")
        else:
            result["presets"] = bench_presets(s, notes)


def main(argv=None) -> dict:
    p = _parser()
    args = p.parse_args(argv)

    _quiet()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
        if not args.memcase and args.threads is None and load > (os.cpu_count() or 1):
            _progress(f"warning: load average {load:.1f} exceeds the {os.cpu_count()} cores: other jobs share this machine and "
                      f"{torch.get_num_threads()} torch threads may be oversubscribed; --threads 1 gives steadier figures")
    except OSError:
        pass
    if args.memcase:
        print(json.dumps(memory_case(json.loads(args.memcase))), flush=True)
        return {}
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    dev = torch.device(args.device)
    s = settings_for(args)
    s["quick"] = args.quick
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    sections -= set(filter(None, args.skip.split(",")))
    unknown = sections - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    notes: list = []
    if args.note:
        notes.append(args.note)
    started = _dt.datetime.now()
    result = {"schema": SCHEMA, "started": started.isoformat(timespec="seconds"), "machine": machine_info(dev),
              "settings": {**s, "sections": sorted(sections)}, "train": [], "sampling": [], "data": [], "scaling": [],
              "presets": None, "notes": notes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['machine']['host']}-{started:%Y-%m-%d}.json"

    def save():  # after every section, so an interrupted run keeps what it measured
        result["wall_s"] = (_dt.datetime.now() - started).total_seconds()
        path.write_text(json.dumps(result, indent=1, default=str))

    _run_sections(sections, s, dev, args, result, save)
    try:
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    if not _finite({k: result[k] for k in ("train", "sampling", "data", "scaling")}):
        notes.append("some measurements are not finite")
    save()
    print(markdown(result))
    print(f"\nwritten: {path}")
    return result


if __name__ == "__main__":
    main()
