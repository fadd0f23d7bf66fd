"""Parameters, forward+backward time and peak memory of every model preset (``configs/model``).

``run_presets(image_size=32, batch_size=8, repeats=5) -> list[dict]`` measures each preset at full
width, composed with the real Hydra configs (MNIST-shaped inputs: 1 channel, 10 classes, the
``cosine`` scheduler's fixed variance), and ``python -m benchmarks.presets`` prints the markdown table.

What is measured:
* ``params``: trainable parameters.
* ``fwd_bwd_s``: wall seconds of one ``loss = model(x, t, y).square().mean(); loss.backward()`` on a
  batch, median of ``repeats`` runs after one warm-up run (min and max are kept too).
* ``peak_mem_mb``: on CUDA, ``torch.cuda.max_memory_allocated`` during one step minus the memory
  allocated before it (activations, gradients and temporaries, not the weights). On CPU, the growth
  of the process's peak resident set over its resident set just before the step, in a fresh
  subprocess that first runs a step of the small MNIST preset (so lazy library initialisation is
  not counted), builds the model, resets the peak (``/proc/self/clear_refs``) and runs one forward+backward — the
  same quantity, measured by the OS (includes allocator slack; excludes the weights already resident).
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def build_preset(name: str, image_size: int, overrides: tuple = ()):
    """The preset's model as ``python -m ddlab.train model=<name> data.image_size=<size>`` builds it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import ddlab.config  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", f"data.image_size={image_size}", *overrides])
    return instantiate(cfg.model)


def _inputs(model, batch_size: int, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, model.in_channels, model.image_size, model.image_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=g).to(device) if model.num_classes else None
    return x, t, y


def _step(model, x, t, y):
    model.zero_grad(set_to_none=True)
    model(x, t, y).square().mean().backward()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_peak_growth_mb(name: str, image_size: int, batch_size: int) -> float | None:
    """Run one step in a fresh subprocess; ``ru_maxrss`` growth over the RSS before the step."""
    cmd = [sys.executable, "-m", "benchmarks.presets", "--_memory", name, "--image-size", str(image_size), "--batch-size", str(batch_size)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if out.returncode != 0:
        print(f"memory subprocess for {name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _memory_child(name: str, image_size: int, batch_size: int) -> None:
    """A step of the small MNIST preset first (lazy library initialisation is not the step's memory), then
    the preset is built, the peak RSS reset (``/proc/self/clear_refs`` = 5 resets VmHWM) and its first step
    measured (a second step would reuse memory the allocator kept from the first)."""
    import gc

    warm = build_preset("unet_res_mnist", image_size).train()  # initialises the kernels' libraries and thread pools
    _step(warm, *_inputs(warm, 2, torch.device("cpu")))
    del warm
    gc.collect()
    model = build_preset(name, image_size).train()
    x, t, y = _inputs(model, batch_size, torch.device("cpu"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False  # no peak reset: fall back to the lifetime peak
    before = _status_mb("VmRSS")
    _step(model, x, t, y)
    peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"growth_mb": peak - before, "rss_before_mb": before, "peak_rss_mb": peak, "peak_reset": reset}))


def measure_preset(name: str, image_size: int = 32, batch_size: int = 8, repeats: int = 5, device: str | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_preset(name, image_size).to(dev).train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x, t, y = _inputs(model, batch_size, dev)
    _step(model, x, t, y)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        _step(model, x, t, y)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        _step(model, x, t, y)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        mem_kind = "cuda max_memory_allocated growth"
    else:
        del model
        peak = _cpu_peak_growth_mb(name, image_size, batch_size)
        mem_kind = "peak RSS growth over one step (subprocess, libraries warmed, VmHWM reset)"
    return {
        "preset": name,
        "params": params,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": str(dev),
        "fwd_bwd_s": statistics.median(times),
        "fwd_bwd_min_s": min(times),
        "fwd_bwd_max_s": max(times),
        "repeats": repeats,
        "peak_mem_mb": peak,
        "memory": mem_kind,
    }


def run_presets(image_size: int = 32, batch_size: int = 8, repeats: int = 5) -> list[dict]:
    """Measure every preset in ``configs/model`` (see the module docstring for what each number is)."""
    return [measure_preset(name, image_size, batch_size, repeats) for name in preset_names()]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu}), {torch.get_num_threads()} torch threads"
    return f"{dev}; torch {torch.__version__}"


def markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    head = (
        f"| preset | parameters | fwd+bwd s (median [min-max] of {r0['repeats']}) | peak memory MB |\n"
        "|---|---:|---:|---:|\n"
    )
    body = ""
    for r in rows:
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        body += (
            f"| `{r['preset']}` | {r['params'] / 1e6:.1f} M | "
            f"{r['fwd_bwd_s']:.2f} [{r['fwd_bwd_min_s']:.2f}-{r['fwd_bwd_max_s']:.2f}] | {mem} |\n"
        )
    return head + body


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", default=None, help="comma-separated subset of configs/model names")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory:
        _memory_child(args._memory, args.image_size, args.batch_size)
        return
    names = args.presets.split(",") if args.presets else preset_names()
    rows = []
    for name in names:
        rows.append(measure_preset(name, args.image_size, args.batch_size, args.repeats))
        print(f"{name}: {rows[-1]['fwd_bwd_s']:.2f} s", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{args.image_size} px, batch {args.batch_size}, {machine()}; memory: {rows[0]['memory']}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
