"""Command line of the GPU check: settings, the budgeted sections, the JSON record and the tables."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import ROOT, machine_info

from .budget import Budget, OverBudget
from .devices import peak_tflops
from .e2e import ddp, e2e
from .report import markdown
from .sampling import sampling
from .throughput import throughput

# section: (function, share of the budget)
# in this order; throughput runs last and takes whatever the others left (its case list is open-ended)
SECTIONS = {"e2e": (e2e, 0.50), "sampling": (sampling, 0.12), "ddp": (ddp, 0.10), "throughput": (throughput, 0.28)}
GRACE_S = 10.0  # an in-process step (e.g. a torch.compile) that passes its section's deadline by this much is interrupted


def settings(args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    s = dict(device=device, cuda=cuda, quick=args.quick, guidance_scale=1.25, flops={}, compile=cuda)
    if args.quick:
        s.update(e2e_steps=2, resume_steps=2, ddp_steps=2, train_batches=[8], train_warmup=1, train_steps=3, case_seconds=5.0,
                 sample_batch=8, samplers=[("ddim", 3), ("dpmpp_2m", 2)], sample_repeats=1, train_seconds=0,
                 after_train_s=0, compile_models=[])
    else:
        s.update(e2e_steps=None, resume_steps=10, ddp_steps=20, train_batches=[64, 256], train_warmup=3, train_steps=12, case_seconds=5.0,
                 sample_batch=256, samplers=[("ddim", 50), ("dpmpp_2m", 10)], sample_repeats=3, train_seconds=60,
                 after_train_s=45, compile_models=["unet_res_mnist"] + (["unet_adm"] if (args.budget or 0) >= 900 else []))
    return s


def parse(argv: Optional[list] = None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default cuda)")
    p.add_argument("--quick", action="store_true", help="toy sizes and few steps (the CPU test path; also a GPU smoke run)")
    p.add_argument("--budget", type=float, default=None, help="hard time budget in seconds (default 480; 50 with --quick)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for gpu-<device>-<date>.json")
    p.add_argument("--work", default=None, help="folder for the runs' checkpoints, logs and samples "
                   "(default logs/gpu_check/<device>-<date>)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    bad = [x for x in args.sections.split(",") if x not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    return args


def _device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible (torch.cuda.is_available() is False); run with --device cpu --quick "
                         "to check the script itself")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@contextmanager
def alarm(seconds: float, name: str):
    """Interrupt the block with OverBudget after ``seconds`` (SIGALRM; main thread, POSIX): the hard
    stop for in-process work that cannot check the deadline itself (a compile, a long kernel queue)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise OverBudget(f"{name}: interrupted {GRACE_S:.0f} s after its deadline")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(0.1, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: Optional[list] = None) -> dict:
    args = parse(argv)
    dev = _device(args.device)
    budget = Budget(args.budget or (50.0 if args.quick else 480.0), {k: SECTIONS[k][1] for k in args.sections.split(",")})
    from ddlab import runtime

    s = settings(args, dev)
    if not s["cuda"]:  # the CPU path checks the code, not speed: one thread (and torch_threads=1 in the CLIs)
        torch.set_num_threads(1)  # stays fast on a shared, loaded CI machine where 2 spinning threads crawl
    name = torch.cuda.get_device_name(dev) if s["cuda"] else "cpu"
    s["peak_tflops"], peak_source = peak_tflops(name, args.peak_tflops) if (s["cuda"] or args.peak_tflops) else (None, "CPU")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu-{_slug(name)}-{date}{'-quick' if args.quick else ''}.json"
    s["out_dir"] = str(Path(args.work) if args.work else ROOT / "logs" / "gpu_check" / f"{_slug(name)}-{date}")
    result = {"machine": machine_info(dev), "device_name": name, "quick": args.quick, "budget_s": budget.seconds,
              "peak_bf16_tflops": s["peak_tflops"], "peak_source": peak_source,
              "runtime": {**runtime.apply(device=dev), "in_force": runtime.current()}, "sections": {}}
    for key in budget.shares:
        fn = SECTIONS[key][0]
        sec = budget.section(key)
        print(f"[gpu_check] {key}: {sec.seconds:.0f} s share", file=sys.stderr, flush=True)
        try:
            with alarm(sec.left() + GRACE_S, key):
                res = fn(s, sec)
        except OverBudget as e:
            res = {"rows": []}
            sec.note(str(e))
        except Exception as e:  # a broken section is reported, the others still run
            res = {"rows": [], "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            sec.note(f"failed: {type(e).__name__}: {str(e)[:300]}")
        result["sections"][key] = {**res, "seconds": round(sec.elapsed(), 1), "share_s": round(sec.seconds, 1), "notes": sec.notes}
        path.write_text(json.dumps(result, indent=1, default=str))  # after every section: a cut run keeps what it measured
    result["total_seconds"] = round(time.monotonic() - budget.start, 1)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(markdown(result))
    print(f"\nwritten: {path}")
    return result
