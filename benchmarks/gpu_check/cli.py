"""Subprocess helpers: run ``python -m ddlab.*`` under the section's deadline, find the MNIST files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.common import ROOT

from .budget import OverBudget, Section

MNIST_FILE = "train-images-idx3-ubyte"


def mnist_dir() -> Optional[Path]:
    """Where the MNIST IDX files are: $DDLAB_DATA_DIR, then the project's offline copies, then ./data."""
    from ddlab.data.mnist import find_mnist_dir

    env = os.environ.get("DDLAB_DATA_DIR")
    for cand in ([env] if env else []) + [ROOT / ".." / "shared" / "data", ROOT / "shared" / "data", ROOT / "data"]:
        found = find_mnist_dir(cand)
        if found is not None:
            return found.resolve()
    return None


def child_env(data_dir: Optional[Path], threads: Optional[int] = None) -> dict:
    """The environment of the CLI subprocesses: this checkout's sources, the MNIST folder, and on CPU
    ``threads`` OpenMP threads (for CLIs without a torch_threads key)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if data_dir is not None:
        env["DDLAB_DATA_DIR"] = str(data_dir)
    env.setdefault("WANDB_MODE", "offline")
    env["HYDRA_FULL_ERROR"] = "1"
    return env


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_module(module: str, args: Sequence[str], section: Section, log_path: Path, env: dict, what: str,
               min_seconds: float = 3.0) -> dict:
    """Run ``python -m module args`` with output to ``log_path``, killed (its whole process group) when
    the section's time is up. Returns ``{ok, rc, seconds, log[, tail]}``; raises OverBudget when
    there is no time to start it or it was cut."""
    section.check(what)
    timeout = section.left()
    if timeout < min_seconds:
        raise OverBudget(f"{section.name}: no time left to start '{what}' ({timeout:.0f} s)")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", module, *args]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise OverBudget(f"{section.name}: '{what}' was killed at the section's deadline ({timeout:.0f} s); log {log_path}") from None
        except BaseException:  # the budget alarm or Ctrl-C: the child (and its DDP workers) must not outlive the check
            _kill(proc)
            raise
    out = {"ok": rc == 0, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log": str(log_path)}
    if rc != 0:
        out["tail"] = log_path.read_text(errors="replace")[-1500:]
        section.note(f"{what} failed (exit {rc}); see {log_path}")
    return out
