"""Measurement helpers for ``benchmarks.run``: timing, statistics, memory, config composition.

Nothing here is a test: these functions measure and report, they never assert a speed.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


# ---------------------------------------------------------------------- statistics
def stats(values: Iterable[float]) -> dict:
    """Median and spread of repeated measurements: ``median, q25, q75, min, max, n, values``."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("no measurements")
    if len(v) >= 2:
        q = statistics.quantiles(v, n=4, method="inclusive")
        q25, q75 = q[0], q[2]
    else:
        q25 = q75 = v[0]
    return {"median": statistics.median(v), "q25": q25, "q75": q75, "min": v[0], "max": v[-1], "n": len(v), "values": v}


def fmt(s: Optional[dict], digits: int = 1) -> str:
    """``median [min-max]`` for a markdown cell."""
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


# ---------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = now(device)
        fn()
        out.append(now(device) - t0)
    return out


# ---------------------------------------------------------------------- memory
def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: ``/proc/self/clear_refs`` = 5 resets VmHWM), so a later
    :func:`peak_rss_mb` measures from now on rather than counting import and start-up peaks."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM), else since the start (``getrusage``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return max_rss_mb()


def max_rss_mb() -> float:
    """Peak resident set size of this process so far in MiB (``getrusage``; KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def cuda_peak(device: torch.device, out: dict):
    """Record ``torch.cuda.max_memory_allocated`` over the block into ``out['peak_mb']``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


# ---------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict:
    import lightning

    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "device": str(device),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------- configs
def preset_names() -> list[str]:
    """Model presets found in ``configs/model/*.yaml`` (read at run time, so new presets are picked up)."""
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def data_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))


def compose(overrides: Sequence[str] = ()):
    """Compose ``configs/train.yaml`` with Hydra as the CLI would (no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    import ddlab.config  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(ROOT / "logs" / "bench")
    return cfg


def progress(msg: str) -> None:
    """One progress line on stderr (stdout carries the tables)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cell(v) -> str:
    """A table cell: floats to 4 significant digits, statistics dicts as median [min-max]."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "median" in v:
        return fmt(v, 2)
    return str(v)


def table(caption: str, header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """Markdown lines: the caption, a blank line, the table, a blank line (the writer every section uses)."""
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return lines + [""]
