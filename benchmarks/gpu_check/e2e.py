"""End to end through the command-line entry points: train (bf16, fp16), resume, sample, FID, DDP."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from benchmarks.common import ROOT

from .budget import OverBudget, Section
from .cli import child_env, mnist_dir, run_module



def _max_time(seconds: float) -> str:
    s = max(1, int(round(seconds)))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_overrides(s: dict, precision: str, run_dir: Path, seconds: float = 0.0) -> list[str]:
    """``make train``'s recipe (experiment=mnist_cfg) on the checked device; toy sizes in --quick, and
    float32 on CPU (bf16 autocast on a CPU is an emulation, not what the check is about)."""
    o = ["experiment=mnist_cfg", f"trainer.precision={precision if s['cuda'] else '32-true'}", f"hydra.run.dir={run_dir}", "logger=csv",
         "callbacks.checkpoint.every_n_steps=0"]
    o += ["trainer=gpu"] if s["cuda"] else ["trainer=cpu", "torch_threads=1"]
    if s["quick"]:
        o += ["trainer.max_time=null", f"trainer.max_steps={s['e2e_steps']}", "model.base_channels=8", "data.limit=256",
              "data.val_limit=32", "data.batch_size=16", "trainer.limit_val_batches=1", "callbacks.sample_grid.n=4",
              "sampler.steps=2"]
    else:
        o += [f"trainer.max_time={_max_time(seconds or s['train_seconds'])}", "trainer.max_steps=-1"]
    return o


def _metrics(run_dir: Path) -> dict:
    p = run_dir / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _skipped_steps(ckpt: Path) -> Optional[int]:
    import torch

    if not ckpt.is_file():
        return None
    return int(torch.load(ckpt, map_location="cpu", weights_only=False).get("skipped_steps", 0))


def train_and_resume(s: dict, sec: Section, env: dict, precision: str, row: dict) -> dict:
    """One training run (grid, last.ckpt) and a resume of ``s['resume_steps']`` more steps from its checkpoint."""
    base = Path(s["out_dir"]) / "e2e" / precision
    seconds = min(s["train_seconds"], sec.left() - s["after_train_s"])  # leave time for start-up, grid and resume
    if not s["quick"] and seconds < s["train_seconds"]:
        sec.note(f"{precision}: trained {max(seconds, 0):.0f} s instead of {s['train_seconds']} s (the section's time left)")
    args = train_overrides(s, precision, base / "train", max(seconds, 5))
    row["precision"] = precision if s["cuda"] else "32-true"
    row["train"] = run_module("ddlab.train", args, sec, base / "train.log", env, f"train {precision}")
    m = _metrics(base / "train")
    ckpt = base / "train" / "checkpoints" / "last.ckpt"
    grids = sorted((base / "train" / "samples").glob("*.png"))
    row.update(steps=m.get("global_step"), train_loss=m.get("train/loss"), val_mse=m.get("val/mse"),
               checkpoint=str(ckpt) if ckpt.is_file() else None, sample_grid=str(grids[-1]) if grids else None)
    if m.get("global_step") and row["train"]["seconds"]:
        row["steps_per_s_incl_startup"] = round(m["global_step"] / row["train"]["seconds"], 2)
    if precision == "16-mixed":
        row["skipped_steps"] = _skipped_steps(ckpt)  # the resume below updates it
    if not ckpt.is_file():
        sec.note(f"{precision}: no checkpoint was written; resume skipped")
        return row
    target = int(m.get("global_step", 0)) + s["resume_steps"]
    rargs = [a for a in train_overrides(s, precision, base / "resume") if not a.startswith("trainer.max_")]
    rargs += [f"ckpt_path={ckpt}", f"trainer.max_steps={target}", "trainer.max_time=null"]
    row["resume"] = run_module("ddlab.train", rargs, sec, base / "resume.log", env, f"resume {precision}")
    after = _metrics(base / "resume").get("global_step")
    row["resumed_steps"] = None if after is None else int(after) - int(m.get("global_step", 0))
    if "16-mixed" == precision:
        row["skipped_steps"] = _skipped_steps(base / "resume" / "checkpoints" / "last.ckpt")
    return row


def _classifier(s: dict, sec: Section, env: dict) -> tuple[Optional[str], str]:
    """The mnist_cnn weights for the domain FID: an existing classifier, else one trained here."""
    log_dir = Path(os.environ.get("DDLAB_LOG_DIR", ROOT / "logs"))
    for cand in (os.environ.get("DDLAB_MNIST_CNN"), log_dir / "classifiers" / "mnist_cnn.pt"):
        if cand and Path(cand).is_file():
            return str(cand), "existing classifier"
    out = Path(s["out_dir"]) / "e2e" / "mnist_cnn.pt"
    args = ["train", "data=mnist", f"out={out}", "epochs=1"]
    args += ["limit=512", "test_limit=256"] if s["quick"] else ["limit=20000", "test_limit=2000"]
    r = run_module("ddlab.metrics.classifier", args, sec, out.with_suffix(".log"), env, "train mnist_cnn")
    return (str(out), "trained here (1 epoch; its FID is not comparable with the README's)") if r["ok"] else (None, "training failed")


def sample_and_fid(s: dict, sec: Section, env: dict, ckpt: str, out: dict) -> dict:
    base = Path(s["out_dir"]) / "e2e" / "eval"
    n = 8 if s["quick"] else 256
    dev = ["device=cuda"] if s["cuda"] else ["device=cpu", "torch_threads=1"]
    steps = ["sampler.steps=2"] if s["quick"] else []
    args = [f"ckpt={ckpt}", f"n={n}", f"batch_size={n}", f"out={base / 'sample'}", f"hydra.run.dir={base / 'sample'}",
            "progress=false"] + dev + steps
    out["sample"] = run_module("ddlab.sample", args, sec, base / "sample.log", env, "ddlab.sample")
    out["sample_grid"] = str(base / "sample" / "grid.png") if (base / "sample" / "grid.png").is_file() else None
    path, how = _classifier(s, sec, env)
    out["classifier"] = how
    if path is None:
        sec.note("fid: no mnist_cnn classifier (make classifier) and none could be trained; ddlab.fid skipped")
        return out
    n_fid = 32 if s["quick"] else 2000
    args = [f"ckpt={ckpt}", f"n={n_fid}", f"batch_size={min(n_fid, 500)}", "fid.feature_extractor=mnist_cnn",
            f"fid.classifier_path={path}", f"fid.cache_dir={base / 'fid_stats'}", "fid.kid=false", "fid.isc=false",
            f"reference.limit={n_fid}", f"output={base / 'fid.json'}", f"hydra.run.dir={base / 'fid'}", "progress=false"] + dev + steps
    out["fid_run"] = run_module("ddlab.fid", args, sec, base / "fid.log", env, "ddlab.fid")
    if (base / "fid.json").is_file():
        rec = json.loads((base / "fid.json").read_text())
        out["fid"] = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def e2e(s: dict, sec: Section) -> dict:
    """bf16 (and on CUDA fp16) training with resume, then sample and FID from the bf16 checkpoint.
    A cut keeps what finished (``out`` and its rows are filled in place)."""
    data = mnist_dir()
    if data is None:
        sec.note("MNIST IDX files not found ($DDLAB_DATA_DIR, ../shared/data, ./data): end-to-end runs skipped")
        return {"rows": []}
    if not s["cuda"]:
        sec.note("fp16-mixed (grad scaler) and bf16-mixed: CUDA only; the CPU path trains in float32")
    env = child_env(data, None if s["cuda"] else 1)
    out: dict = {"rows": []}
    try:  # bf16, then sample and FID on its checkpoint, then fp16 (the last gets what time is left)
        out["rows"].append({})
        train_and_resume(s, sec, env, "bf16-mixed", out["rows"][-1])
        if out["rows"][0].get("checkpoint"):
            out["eval"] = {}
            sample_and_fid(s, sec, env, out["rows"][0]["checkpoint"], out["eval"])
        if s["cuda"]:
            out["rows"].append({})
            train_and_resume(s, sec, env, "16-mixed", out["rows"][-1])
    except OverBudget as e:
        sec.note(str(e))
    return out


def ddp(s: dict, sec: Section) -> dict:
    """``trainer=ddp`` over NCCL on every visible GPU (gloo on CPU): starts, trains 20 steps, checkpoints."""
    import torch

    data = mnist_dir()
    if data is None:
        sec.note("MNIST not found: DDP run skipped")
        return {"rows": []}
    devices = torch.cuda.device_count() if s["cuda"] else 1
    run_dir = Path(s["out_dir"]) / "ddp"
    steps = s["ddp_steps"]
    args = [a for a in train_overrides(s, "bf16-mixed" if s["cuda"] else "32-true", run_dir) if not a.startswith("trainer=")]
    args = [a for a in args if not a.startswith("trainer.max_")]
    args += ["trainer=ddp", f"trainer.devices={devices}", f"trainer.accelerator={'gpu' if s['cuda'] else 'cpu'}",
             f"trainer.max_steps={steps}", "trainer.max_time=null", "callbacks.sample_grid.at_end=false"]
    r = run_module("ddlab.train", args, sec, run_dir.with_suffix(".log"), child_env(data, None if s["cuda"] else 1), f"ddp x{devices}")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    backend = "nccl" if s["cuda"] else "gloo"
    return {"rows": [{"devices": devices, "backend": backend, "steps": _metrics(run_dir).get("global_step"),
                      "checkpoint": ckpt.is_file(), **r}]}
