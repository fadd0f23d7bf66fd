"""Training throughput: the ddlab Lightning step against a bare PyTorch loop around the same network
and loss, per precision, memory format and torch.compile; peak memory and model FLOP utilisation."""

from __future__ import annotations

import copy
import tempfile
import time
from contextlib import nullcontext
from typing import Optional

import torch

from benchmarks.common import compose, now

from .budget import OverBudget, Section

AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def model_specs(s: dict) -> list[dict]:
    """(preset, image size, channels, extra overrides) of the measured networks."""
    if s["quick"]:
        return [dict(preset="unet_res_mnist", size=28, channels=1, extra=["model.base_channels=8"]),
                dict(preset="unet_adm", size=16, channels=3, extra=["model.base_channels=16", "model.head_channels=16",
                                                                    "model.num_blocks=1"])]
    return [dict(preset="unet_res_mnist", size=28, channels=1, extra=[]), dict(preset="unet_adm", size=64, channels=3, extra=[])]


def cases(s: dict) -> list[dict]:
    """Every measured case, most important first (a cut section keeps the head of the list): each
    precision at the first batch, channels-last and compile there (bf16), then the larger batches."""
    precisions = ["bf16-mixed", "32-true", "16-mixed"] if s["cuda"] else ["32-true"]  # CPU bf16 autocast is emulated
    first, more, main = s["train_batches"][0], s["train_batches"][1:], precisions[0]

    def case(m, b, p, cl=False, comp=False):
        return dict(spec=m, batch=b, precision=p, channels_last=cl, compile=comp)

    out = [case(m, first, p) for p in precisions for m in model_specs(s)]
    out += [case(m, first, main, cl=True) for m in model_specs(s)]
    out += [case(m, first, main, comp=True) for m in model_specs(s) if m["preset"] in s["compile_models"]]
    out += [case(m, b, p) for b in more for p in precisions for m in model_specs(s)]
    return out


def build(case: dict, device: torch.device):
    """(cfg, model on device, diffusion, loader) for one case, from the real configs."""
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from ddlab.data import TensorImageDataset

    m = case["spec"]
    ov = [f"model={m['preset']}", f"data.image_size={m['size']}", f"data.channels={m['channels']}", "data.num_classes=10",
          f"++model.channels_last={str(case['channels_last']).lower()}", f"++model.compile={str(case['compile']).lower()}"]
    cfg = compose(ov + list(m["extra"]))
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device)
    if case["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    n = case["batch"] * case["n_batches"]
    x = torch.rand(n, m["channels"], m["size"], m["size"], generator=g) * 2 - 1
    y = torch.randint(0, 10, (n,), generator=g)
    loader = DataLoader(TensorImageDataset(x, y), batch_size=case["batch"], shuffle=False, drop_last=True,
                        pin_memory=device.type == "cuda")
    return cfg, model, instantiate(cfg.scheduler), loader


def count_flops(cfg, model, diffusion, batch: int, device: torch.device, probe: int = 4) -> Optional[int]:
    """FLOPs of one training step's forward and backward (torch.utils.flop_counter; matmuls, convolutions
    and attention), counted at batch ``probe`` and scaled to ``batch`` (every counted op is linear in
    the batch), so counting never needs the memory of the full batch."""
    from torch.utils.flop_counter import FlopCounterMode

    m, n = cfg.model, min(batch, probe)
    x = torch.randn(n, int(m.in_channels), int(m.image_size), int(m.image_size), device=device)
    t = torch.randint(0, diffusion.num_timesteps, (n,), device=device)
    y = torch.randint(0, 10, (n,), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = diffusion.training_losses(model, x, t, y)["loss"].mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops()) * batch // n


class _Stop:
    """When a timed loop ends: after ``warmup + steps`` batches, ``seconds`` after the warm-up (a compile
    or cuDNN autotuning happens in the warm-up, which only the section's deadline bounds), or at the
    section's ``deadline``; ``cut`` says that it ended before all its steps."""

    def __init__(self, warmup: int, steps: int, seconds: float, deadline: float):
        self.warmup, self.total, self.seconds, self.deadline, self.cut = warmup, warmup + steps, seconds, deadline, False

    def done(self, ends: list) -> bool:
        if len(ends) == self.warmup:
            self.deadline = min(self.deadline, time.monotonic() + self.seconds)
        if len(ends) >= self.total:
            return True
        if time.monotonic() >= self.deadline:
            self.cut = True
            return True
        return False


def run_lightning(cfg, model, diffusion, loader, case: dict, device: torch.device, stop: _Stop) -> list[float]:
    """DiffusionModule with a real Trainer (EMA callback as configured; logging, checkpoints and
    progress bar off). Returns the end time of each batch, device-synchronised."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Callback

    ends: list[float] = []

    class Timer(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ends.append(now(device))
            if stop.done(ends):
                trainer.should_stop = True

    module = instantiate(cfg.module, _partial_=True)(model=model, diffusion=diffusion, sampler=None)
    callbacks = [instantiate(cfg.callbacks.ema), Timer()]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=case["precision"],
                             max_steps=stop.total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             gradient_clip_val=cfg.trainer.gradient_clip_val, benchmark=device.type == "cuda",
                             log_every_n_steps=int(cfg.trainer.log_every_n_steps), callbacks=callbacks, default_root_dir=tmp)
        trainer.fit(module, train_dataloaders=loader)
    return ends


def run_bare(cfg, model, diffusion, loader, case: dict, device: torch.device, stop: _Stop) -> list[float]:
    """The same step by hand: label drop, timesteps and noise on the device, autocast (+ grad scaler
    for fp16), clipping, AdamW, EMA lerp. Returns per-batch end times."""
    from hydra.utils import instantiate

    hp = cfg.module
    dtype = AUTOCAST[case["precision"]]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    opt = instantiate(hp.optimizer)(model.parameters())  # the run's module.optimizer (AdamW by default)
    params, clip = list(model.parameters()), cfg.trainer.gradient_clip_val
    ends: list[float] = []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        drop = torch.rand(y.shape[0], device=device) < hp.p_uncond
        y = torch.where(drop, torch.full_like(y, 10), y)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with autocast:
            loss = diffusion.training_losses(model, x, t, y)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in params], 1e-3)
        ends.append(now(device))
        if stop.done(ends):
            break
    return ends


def images_per_s(ends: list[float], warmup: int, batch: int) -> Optional[float]:
    timed = ends[max(0, warmup - 1):]
    if len(timed) < 2:
        return None
    return batch * (len(timed) - 1) / (timed[-1] - timed[0])


def measure(case: dict, s: dict, sec: Section, runner, impl: str) -> dict:
    """One implementation of one case: images/s, peak memory, FLOP utilisation, whether it was cut."""
    dev = s["device"]
    warmup, steps = s["train_warmup"] + (2 if case["compile"] else 0), s["train_steps"]
    case = {**case, "n_batches": warmup + steps}
    cfg, model, diffusion, loader = build(case, dev)
    key = (case["spec"]["preset"], case["spec"]["size"], case["batch"])
    if key not in s["flops"] and not case["compile"]:
        s["flops"][key] = count_flops(cfg, model, diffusion, case["batch"], dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    sec.check(f"{case['spec']['preset']} {impl}")
    stop = _Stop(warmup, steps, min(s["case_seconds"], sec.left() / 2), sec.deadline)
    ends = runner(cfg, model, diffusion, loader, case, dev, stop)
    ips = images_per_s(ends, warmup, case["batch"])
    flops = s["flops"].get(key)
    out = {"impl": impl, "images_per_s": ips, "steps": len(ends), "cut": stop.cut,
           "peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
           "flops_per_step": flops}
    if ips and flops and s["peak_tflops"]:
        out["mfu"] = flops * ips / case["batch"] / (s["peak_tflops"] * 1e12)
    del model, loader
    return out


def throughput(s: dict, sec: Section) -> dict:
    rows = []
    if not s["cuda"]:
        sec.note("bf16-mixed, fp16-mixed and torch.compile: measured on CUDA only (float32 on CPU)")
    skipped = [m["preset"] for m in model_specs(s) if s["cuda"] and m["preset"] not in s["compile_models"]]
    if skipped:
        sec.note(f"torch.compile of {', '.join(skipped)} not measured (its compile time exceeds the share; run with --budget 900)")
    for case in cases(s):
        label = f"{case['spec']['preset']} {case['spec']['size']}px b{case['batch']} {case['precision']}"
        label += " channels-last" if case["channels_last"] else ""
        label += " compile" if case["compile"] else ""
        try:
            sec.check(label)
        except OverBudget as e:
            sec.note(f"{e}; not measured: {label} and the cases after it")
            break
        row = {"case": label, "preset": case["spec"]["preset"], "image_size": case["spec"]["size"], "batch": case["batch"],
               "precision": case["precision"], "channels_last": case["channels_last"], "compile": case["compile"]}
        try:
            bare = measure(case, s, sec, run_bare, "bare")
            light = measure(case, s, sec, run_lightning, "lightning")
        except OverBudget as e:
            sec.note(f"{e}; not measured: {label} and the cases after it")
            break
        except Exception as e:  # one failing configuration (e.g. compile) must not end the report
            sec.note(f"{label}: {type(e).__name__}: {str(e)[:300]}")
            rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        row.update(bare=bare, lightning=light)
        if bare["images_per_s"] and light["images_per_s"]:
            row["ratio"] = light["images_per_s"] / bare["images_per_s"]
        rows.append(row)
    return {"rows": rows}
