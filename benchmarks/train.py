"""Training section of ``benchmarks.run``: the ddlab Lightning step versus a bare PyTorch loop doing the
same work (same model and initial weights, label dropout, timestep sampler, ``training_losses``,
optimizer + LR schedule from ``module.*``, precision, batch, gradient clipping and EMA update)."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from typing import Optional

import torch

from benchmarks.common import ROOT, compose, fmt, now, peak_rss_mb, reset_peak_rss, rss_mb, stats, table
from benchmarks.common import progress as _progress

DEFAULT_MODEL = "unet_res_mnist"


class Case:
    """A model preset at one image size and batch, composed with Hydra from the real configs.

    Images are RGB (``data.channels=3``) with 10 classes, drawn at random in memory: the training
    step's cost does not depend on pixel values.
    """

    def __init__(self, preset: Optional[str], image_size: int, batch: int, device: torch.device, base_channels: Optional[int] = None,
                 channels: int = 3, num_classes: int = 10, extra: tuple = ()):
        self.preset, self.image_size, self.batch, self.device = preset, image_size, batch, device
        self.overrides = [f"data.image_size={image_size}", f"data.channels={channels}", f"data.num_classes={num_classes}"]
        if preset is not None:  # None: train.yaml's default model
            self.overrides.insert(0, f"model={preset}")
        if device.type == "cuda":
            self.overrides.append("trainer=gpu")
        self.overrides += list(extra)
        if base_channels:
            self.overrides.append(f"model.base_channels={base_channels}")
            # attention heads must divide the reduced widths: one head of base_channels channels
            if compose(self.overrides).model.get("head_channels"):
                self.overrides.append(f"model.head_channels={base_channels}")
        self.cfg = compose(self.overrides)
        from hydra.utils import instantiate

        torch.manual_seed(0)
        self.init_state = instantiate(self.cfg.model).state_dict()
        self.params = sum(v.numel() for k, v in self.init_state.items() if not k.endswith(("running_mean", "running_var")))
        self.precision = str(self.cfg.trainer.get("precision", "32-true"))
        self.clip = self.cfg.trainer.get("gradient_clip_val")
        self.clip_algo = self.cfg.trainer.get("gradient_clip_algorithm", "norm") or "norm"
        self.log_every = int(self.cfg.trainer.get("log_every_n_steps", 50))
        ema = (self.cfg.get("callbacks") or {}).get("ema")
        self.ema_cfg = ema if ema is not None and "_target_" in ema else None
        self.channels = channels
        self.num_classes = num_classes

    def model(self):
        from hydra.utils import instantiate

        m = instantiate(self.cfg.model)
        m.load_state_dict(self.init_state)
        return m

    def loader(self, n_batches: int):
        from torch.utils.data import DataLoader

        from ddlab.data import TensorImageDataset

        g = torch.Generator().manual_seed(1)
        n = n_batches * self.batch
        x = torch.rand(n, self.channels, self.image_size, self.image_size, generator=g) * 2 - 1
        y = torch.randint(0, max(1, self.num_classes), (n,), generator=g)
        return DataLoader(TensorImageDataset(x, y), batch_size=self.batch, shuffle=True, num_workers=0, drop_last=True)

    def autocast(self):
        if "bf16" in self.precision:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if "16-mixed" in self.precision:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return nullcontext()


def run_lightning(case: Case, warmup: int, steps: int, mem: Optional[dict] = None) -> list[float]:
    """Fit ``DiffusionModule`` for ``warmup + steps`` optimizer steps with a real Trainer (logging,
    checkpointing, progress bar and model summary off). Returns the end time of every batch
    (device synchronised), taken by the last callback, after the EMA update."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Callback

    dev = case.device
    ends: list[float] = []

    class StepTimer(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ends.append(now(dev))

    diffusion = instantiate(case.cfg.scheduler)
    module = instantiate(case.cfg.module, _partial_=True)(model=case.model(), diffusion=diffusion, sampler=None)
    callbacks = ([instantiate(case.ema_cfg)] if case.ema_cfg is not None else []) + [StepTimer()]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1, precision=case.precision,
            max_steps=warmup + steps, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            gradient_clip_val=case.clip, gradient_clip_algorithm=case.clip_algo, log_every_n_steps=case.log_every,
            callbacks=callbacks, default_root_dir=tmp,
        )
        if mem is not None:
            module.to(dev)
            mem["peak_reset"] = reset_peak_rss()  # import and start-up peaks are not the training's memory
            mem["baseline_rss_mb"] = rss_mb()
        trainer.fit(module, train_dataloaders=case.loader(warmup + steps))
    return ends


def run_bare(case: Case, warmup: int, steps: int, mem: Optional[dict] = None, compile_model: bool = False,
             channels_last: bool = False) -> list[float]:
    """The same work as :func:`run_lightning` in a hand-written loop. Returns per-batch end times."""
    from hydra.utils import instantiate

    dev = case.device
    hp = case.cfg.module
    diffusion = instantiate(case.cfg.scheduler)
    model = case.model().to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    ema = instantiate(case.ema_cfg) if case.ema_cfg is not None else None
    net = torch.compile(model) if compile_model else model
    opt = instantiate(hp.optimizer)(model.parameters())  # module.optimizer / lr_scheduler / timestep_sampler, as the module builds them
    sched = None
    if hp.get("lr_scheduler") is not None:
        total = {"total_steps": warmup + steps} if "total_steps" in hp.lr_scheduler and hp.lr_scheduler.total_steps is None else {}
        sched = instantiate(hp.lr_scheduler)(opt, **total)
    ts = instantiate(hp.timestep_sampler)(diffusion.num_timesteps)
    num_classes = int(getattr(model, "num_classes", 0))
    params = list(model.parameters())
    if mem is not None:
        mem["peak_reset"] = reset_peak_rss()
        mem["baseline_rss_mb"] = rss_mb()
    ends: list[float] = []
    step = 0
    for x, y in case.loader(warmup + steps):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if num_classes == 0:
            y = None
        elif hp.p_uncond > 0:
            drop = torch.rand(y.shape[0], device=dev) < hp.p_uncond
            y = torch.where(drop, torch.full_like(y, num_classes), y)
        t, w = ts.sample(x.shape[0], device=dev)
        with case.autocast():
            terms = diffusion.training_losses(net, x, t, y)
            loss = (terms["loss"] * w).mean()
        ts.update(t, terms["loss"].detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if case.clip:
            if case.clip_algo == "value":
                torch.nn.utils.clip_grad_value_(params, case.clip)
            else:
                torch.nn.utils.clip_grad_norm_(params, case.clip)
        opt.step()
        if sched is not None:
            sched.step()
        step += 1
        if ema is not None and step % ema.update_every == 0:
            d = ema.decay_at(step)
            with torch.no_grad():
                torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)
                for eb, sb in zip(ema_model.buffers(), model.buffers()):
                    eb.copy_(sb)
        ends.append(now(dev))
    return ends


def throughput(ends: list[float], warmup: int, batch: int) -> tuple[float, list[float]]:
    """(images/s over the timed steps, per-step seconds) from batch end times."""
    timed = ends[warmup - 1:] if warmup > 0 else ends
    if len(timed) < 2:
        raise RuntimeError(f"too few steps were timed ({len(ends)} batches, warm-up {warmup})")
    per_step = [b - a for a, b in zip(timed, timed[1:])]
    return batch * len(per_step) / (timed[-1] - timed[0]), per_step


def memory_case(spec: dict) -> dict:
    """Run in a fresh subprocess: one case, ``warmup=1, steps=2``; report RSS growth."""
    dev = torch.device(spec["device"])
    case = Case(spec["preset"], spec["image_size"], spec["batch"], dev, spec.get("base_channels"))
    mem: dict = {}
    (run_lightning if spec["mode"] == "ddlab" else run_bare)(case, 1, 2, mem=mem)
    peak = peak_rss_mb()
    return {"peak_rss_mb": peak, "baseline_rss_mb": mem["baseline_rss_mb"], "growth_mb": peak - mem["baseline_rss_mb"],
            "peak_reset": mem.get("peak_reset", False)}


def cpu_memory(spec: dict) -> Optional[dict]:
    cmd = [sys.executable, "-m", "benchmarks.run", "--memcase", json.dumps(spec), "--threads", str(torch.get_num_threads())]
    try:
        out = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    logging.getLogger("bench").warning("memory subprocess failed: %s", out.stderr[-2000:])
    return None


def bench_train(s: dict, dev: torch.device, memory: bool, notes: list) -> list[dict]:
    rows = []
    for preset in s["presets"]:
        for size in s["sizes"]:
            label = f"{preset} @ {size}px"
            try:
                case = Case(preset, size, s["train_batch"], dev, s["base_channels"])
            except Exception as e:  # noqa: BLE001  (a preset that cannot take these sizes is reported, not fatal)
                notes.append(f"train {label}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            _progress(f"train {label} ({case.params:,} params)")
            ddlab_ips, bare_ips, ratios, ddlab_step, bare_step = [], [], [], [], []
            mem = {"ddlab": {}, "bare": {}}
            try:
                for r in range(s["repeats"]):
                    order = ("ddlab", "bare") if r % 2 == 0 else ("bare", "ddlab")
                    got = {}
                    for mode in order:
                        m = mem[mode] if r == 0 else None
                        fn = run_lightning if mode == "ddlab" else run_bare
                        if dev.type == "cuda" and m is not None:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        got[mode] = throughput(fn(case, s["warmup"], s["steps"], mem=m), s["warmup"], case.batch)
                        if dev.type == "cuda" and m is not None:
                            m["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                    ddlab_ips.append(got["ddlab"][0])
                    bare_ips.append(got["bare"][0])
                    ddlab_step += got["ddlab"][1]
                    bare_step += got["bare"][1]
                    ratios.append(got["ddlab"][0] / got["bare"][0])
            except Exception as e:  # noqa: BLE001  (reported in the notes, not fatal)
                notes.append(f"train {label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            peak = {}
            for mode in ("ddlab", "bare"):
                if dev.type == "cuda":
                    peak[mode] = mem[mode].get("peak_mb")
                elif memory:
                    spec = dict(preset=preset, image_size=size, batch=case.batch, device="cpu", base_channels=s["base_channels"], mode=mode)
                    res = cpu_memory(spec)
                    peak[mode] = res["growth_mb"] if res else None
                else:
                    peak[mode] = None
            rows.append({
                "preset": preset, "image_size": size, "batch_size": case.batch, "channels": case.channels,
                "overrides": case.overrides, "params": case.params, "precision": case.precision,
                "gradient_clip_val": case.clip, "ema": case.ema_cfg is not None,
                "ddlab_images_per_s": stats(ddlab_ips), "bare_images_per_s": stats(bare_ips),
                "ddlab_step_ms": stats([1000 * v for v in ddlab_step]), "bare_step_ms": stats([1000 * v for v in bare_step]),
                "ratio": stats(ratios),
                "ddlab_peak_memory_mb": peak["ddlab"], "bare_peak_memory_mb": peak["bare"],
            })
    return rows


def markdown(rows: list[dict], st: dict, device: str) -> list[str]:
    mem_note = ("peak `torch.cuda.max_memory_allocated`" if device.startswith("cuda") else
                "CPU: peak-RSS growth over the RSS before the first step, peak reset there (start-up excluded), fresh subprocess per case (3 steps)")
    caption = (f"**Training** (batch {st['train_batch']}, {st['steps']} timed steps after {st['warmup']} warm-up, RGB, "
               f"{'model.base_channels=' + str(st['base_channels']) if st['base_channels'] else 'full presets'}; memory: {mem_note})")
    mm = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    return table(caption, ["preset", "px", "params", "ddlab img/s", "bare img/s", "ddlab / bare", "ddlab MiB", "bare MiB"],
                 [[r["preset"], r["image_size"], f"{r['params']:,}", fmt(r["ddlab_images_per_s"]), fmt(r["bare_images_per_s"]),
                   fmt(r["ratio"], 3), mm(r["ddlab_peak_memory_mb"]), mm(r["bare_peak_memory_mb"])] for r in rows])
