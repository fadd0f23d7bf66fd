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
import copy
import datetime as _dt
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import ROOT, compose, data_names, fmt, machine_info, now, peak_rss_mb, preset_names, reset_peak_rss, rss_mb, stats

SCHEMA = "ddlab-bench/1"
DEFAULT_MODEL = "unet_res_mnist"
SHARED_DATA = ROOT.parent / "shared" / "data"
# Offline stand-ins on the project machines (see each data config's header), used only when the configured path fails.
OFFLINE_DATA = {
    "butterflies": [f"data.path={SHARED_DATA / 'butterflies_leeds'}", "data.source=folder"],
    "imagenet64": [f"data.path={SHARED_DATA / 'imagenet64_standin'}", "data.num_classes=200"],
}


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


# ====================================================================== training: one case
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

    from ddlab.diffusion import make_timestep_sampler
    from ddlab.training.module import lr_lambda

    dev = case.device
    hp = case.cfg.module
    diffusion = instantiate(case.cfg.scheduler)
    model = case.model().to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    ema = instantiate(case.ema_cfg) if case.ema_cfg is not None else None
    net = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay, eps=hp.eps)
    total = hp.total_steps or (warmup + steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(hp.warmup_steps, hp.lr_schedule, total, hp.min_lr_ratio))
    ts = make_timestep_sampler(hp.timestep_sampler, diffusion.num_timesteps)
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


# ====================================================================== sampling
def diffusers_loop(model, diffusion_cfg, kind: str, steps: int, shape, y, guidance_scale: float, generator, device):
    """Sample with diffusers' scheduler and the same network, guidance batched into one forward."""
    from diffusers import DDIMScheduler, DDPMScheduler

    sched_kw = dict(num_train_timesteps=int(diffusion_cfg.num_timesteps), clip_sample=True, prediction_type="epsilon",
                    timestep_spacing="trailing")
    if diffusion_cfg.schedule == "cosine":
        sched_kw["beta_schedule"] = "squaredcos_cap_v2"
    else:
        sched_kw.update(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    if kind == "ddim":
        sch = DDIMScheduler(set_alpha_to_one=True, **sched_kw)
    else:
        sch = DDPMScheduler(variance_type="fixed_small", **sched_kw)
    sch.set_timesteps(steps, device=device)
    num_classes = int(getattr(model, "num_classes", 0))
    x = torch.randn(*shape, device=device, generator=generator)
    guided = y is not None and guidance_scale != 1.0
    null = torch.full_like(y, num_classes) if guided else None
    for t in sch.timesteps:
        tb = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        if guided:
            out = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null]))
            cond, uncond = out.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        else:
            eps = model(x, tb, y)
        if kind == "ddim":
            x = sch.step(eps, t, x, eta=0.0).prev_sample
        else:
            x = sch.step(eps, t, x, generator=generator).prev_sample
    return x


def bench_sampling(s: dict, dev: torch.device, notes: list) -> list[dict]:
    from hydra.utils import instantiate

    from ddlab.diffusion import Sampler
    from ddlab.diffusion import resolve_guidance_batching

    try:
        import diffusers  # noqa: F401
    except ImportError:
        notes.append("sampling: diffusers is not installed (pip install -e '.[bench]'); the comparison was skipped")
        return []
    extra = [f"model.base_channels={s['sample_base_channels']}"] if s["sample_base_channels"] else []
    cfg = compose(extra + ["data.num_classes=10"])
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(dev).eval()
    diffusion = instantiate(cfg.scheduler)
    b = s["sample_batch"]
    shape = (b, model.in_channels, model.image_size, model.image_size)
    y = (torch.arange(b) % max(1, model.num_classes)).to(dev)
    w = s["guidance_scale"]
    rows = []
    for kind, steps in (("ddim", s["ddim_steps"]), ("ddpm", s["ddpm_steps"])):
        eta = 0.0 if kind == "ddim" else 1.0
        _progress(f"sampling {kind} {steps} steps, batch {b}")

        def ddlab_fn(n_steps, scale, batching="auto", kind=kind, eta=eta):
            sampler = Sampler(kind=kind, steps=n_steps, eta=eta, spacing="trailing", clip_x0=True, guidance_scale=scale,
                              guidance_batching=batching, progress=False)
            g = torch.Generator(device=dev).manual_seed(0)
            return sampler.sample(model, diffusion, shape, y=y, generator=g)

        def diff_fn(n_steps, scale, kind=kind):
            g = torch.Generator(device=dev).manual_seed(0)
            return diffusers_loop(model, cfg.scheduler, kind, n_steps, shape, y, scale, g, dev)

        # guided: ddlab both ways (one forward of 2B, two of B); `auto` picks one of them per device
        impls = {1.0: [("ddlab", ddlab_fn), ("diffusers", diff_fn)],
                 w: [("ddlab_joint", lambda n, sc: ddlab_fn(n, sc, "joint")), ("ddlab_split", lambda n, sc: ddlab_fn(n, sc, "split")),
                     ("diffusers", diff_fn)]}
        with torch.inference_mode():
            for scale in (1.0, w):  # warm-up: a few steps of each, same shapes
                for _, fn in impls[scale]:
                    fn(min(2, steps), scale)
            times = {(impl, scale): [] for scale in (1.0, w) for impl, _ in impls[scale]}
            for r in range(s["sample_repeats"]):
                for scale in (1.0, w):
                    order = impls[scale]
                    for impl, fn in (order if r % 2 == 0 else order[::-1]):
                        t0 = now(dev)
                        fn(steps, scale)
                        times[(impl, scale)].append(now(dev) - t0)
        auto = resolve_guidance_batching("auto", dev)
        times[("ddlab", w)] = times[(f"ddlab_{auto}", w)]
        base = times[("ddlab", 1.0)]
        for scale in (1.0, w):
            dl, df = times[("ddlab", scale)], times[("diffusers", scale)]
            row = {
                "kind": kind, "steps": steps, "batch_size": b, "guidance_scale": scale, "model_overrides": extra,
                "image_shape": list(shape[1:]),
                "ddlab_images_per_s": stats(b / t for t in dl), "diffusers_images_per_s": stats(b / t for t in df),
                "ratio": stats(a / c for a, c in zip(df, dl)),  # ddlab images/s over diffusers images/s
                "guidance_cost": stats(a / c for a, c in zip(dl, base)),  # time with / without guidance
            }
            if scale != 1.0:
                row["guidance_batching"] = auto  # what the default (`auto`) ran; both are timed
                for mode in ("joint", "split"):
                    row[f"guidance_cost_{mode}"] = stats(a / c for a, c in zip(times[(f"ddlab_{mode}", scale)], base))
                row["diffusers_guidance_cost"] = stats(a / c for a, c in zip(df, times[("diffusers", 1.0)]))
            rows.append(row)
    return rows


# ====================================================================== data loading
def bench_data(s: dict, dev: torch.device, notes: list) -> list[dict]:
    from hydra.utils import instantiate

    rows = []
    for name in data_names():
        base = [f"data={name}"] + ([f"data.limit={s['data_limit']}"] if s["data_limit"] else [])
        dm, errors = None, []
        for extra in (base, base + OFFLINE_DATA.get(name, [])) if name in OFFLINE_DATA else (base,):
            try:
                cfg = compose(extra)
                dm = instantiate(cfg.data)
                dm.prepare_data()
                dm.setup("fit")
                break
            except Exception as e:  # noqa: BLE001  (reported in the notes, not fatal)
                dm = None
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        if dm is None:
            notes.append(f"data {name}: skipped ({'; then with the offline stand-in: '.join(errors)})")
            continue
        if extra != base:
            notes.append(f"data {name}: the configured path is absent here; measured on the offline stand-in ({' '.join(extra[len(base):])})")
        _progress(f"data {name}: batch {dm.batch_size}, {dm.num_workers} workers")
        delivered, first = [], []
        for _ in range(s["repeats"]):
            t0 = now(dev)
            it = iter(dm.train_dataloader())
            batch = next(it)
            t1 = now(dev)
            n = 0
            for _ in range(s["data_batches"]):
                try:
                    batch = next(it)
                except StopIteration:
                    break
                batch[0].to(dev, non_blocking=True)
                n += batch[0].shape[0]
            t2 = now(dev)
            del it
            first.append(t1 - t0)
            if n:
                delivered.append(n / (t2 - t1))
        # what the ddlab training step consumes at this data set's shape, batch and default model
        consumed = None
        try:
            case = Case(None, int(dm.image_size), dm.batch_size, dev, s["base_channels"], channels=int(dm.channels),
                        num_classes=int(dm.num_classes), extra=tuple(extra[:1]) + tuple(extra[len(base):]))
            w, st = max(1, s["warmup"]), max(2, s["steps"])
            consumed = stats(throughput(run_lightning(case, w, st), w, dm.batch_size)[0] for _ in range(max(1, s["repeats"] - 1)))
        except Exception as e:  # noqa: BLE001  (reported in the notes, not fatal)
            notes.append(f"data {name}: training consumption not measured ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        rows.append({
            "data": name, "overrides": extra, "batch_size": dm.batch_size, "num_workers": dm.num_workers, "image_shape": [dm.channels, dm.image_size, dm.image_size],
            "delivered_images_per_s": stats(delivered) if delivered else None, "first_batch_s": stats(first),
            "train_step_images_per_s": consumed,
            "data_bound": bool(delivered and consumed and stats(delivered)["median"] < consumed["median"]),
        })
    return rows


# ====================================================================== scaling
def bench_scaling(s: dict, dev: torch.device, notes: list) -> list[dict]:
    rows = []

    def measure(axis, variant, size, batch, extra=(), preset=DEFAULT_MODEL, **kw):
        try:
            case = Case(preset, size, batch, dev, s["base_channels"], extra=tuple(extra))
            per = []
            for _ in range(s["repeats"]):
                per += throughput(run_bare(case, s["warmup"], s["steps"], **kw), s["warmup"], batch)[1]
        except Exception as e:  # noqa: BLE001  (reported in the notes, not fatal)
            notes.append(f"scaling {axis} {variant} {size}px b{batch}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return None
        st = stats(1000 * v for v in per)
        row = {"axis": axis, "variant": variant, "preset": preset, "image_size": size, "batch_size": batch,
               "precision": case.precision, "step_ms": st, "ms_per_image": st["median"] / batch}
        rows.append(row)
        return row

    _progress("scaling: batch size")
    for b in s["scale_batches"]:
        measure("batch", "default", 32 if not s.get("quick") else s["sizes"][0], b)
    _progress("scaling: image size")
    for size in s["scale_sizes"]:
        measure("image_size", "default", size, s["scale_batch"])
    if dev.type == "cuda":
        _progress("scaling: GPU variants")
        size, b = 64, s["scale_batch"]
        measure("gpu", "fp32", size, b, extra=("trainer.precision=32-true",))
        measure("gpu", "bf16-mixed", size, b, extra=("trainer.precision=bf16-mixed",))
        measure("gpu", "channels_last+bf16", size, b, extra=("trainer.precision=bf16-mixed",), channels_last=True)
        measure("gpu", "torch.compile+bf16", size, b, extra=("trainer.precision=bf16-mixed",), compile_model=True)
        attn = [p for p in preset_names() if "atn" in p or "adm" in p]
        if attn:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for label, backends in (("sdpa-math", [SDPBackend.MATH]),
                                    ("sdpa-fused", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])):
                with sdpa_kernel(backends):
                    measure("gpu", f"{label} ({attn[0]})", size, b, extra=("trainer.precision=bf16-mixed",), preset=attn[0])
        else:
            notes.append("scaling: no attention preset (atn/adm) in configs/model; SDPA variants skipped")
    return rows


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
    mem_note = ("peak `torch.cuda.max_memory_allocated`" if m["device"].startswith("cuda") else
                "CPU: peak-RSS growth over the RSS before the first step, peak reset there (start-up excluded), fresh subprocess per case (3 steps)")
    lines = [(f"Machine: `{m['host']}`, {m['processor']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), "
              f"torch {m['torch']}, lightning {m['lightning']}, device {m['device']}. "
              f"Median [min-max] of {st['repeats']} repeats after warm-up."), ""]
    if result["train"]:
        lines += [(f"**Training** (batch {st['train_batch']}, {st['steps']} timed steps after {st['warmup']} warm-up, RGB, "
                  f"{'model.base_channels=' + str(st['base_channels']) if st['base_channels'] else 'full presets'}; memory: {mem_note})"), "",
                  "| preset | px | params | ddlab img/s | bare img/s | ddlab / bare | ddlab MiB | bare MiB |", "|---|---|---|---|---|---|---|---|"]
        for r in result["train"]:
            mm = lambda v: "n/a" if v is None else f"{v:.0f}"
            lines.append(f"| {r['preset']} | {r['image_size']} | {r['params']:,} | {fmt(r['ddlab_images_per_s'])} | {fmt(r['bare_images_per_s'])} "
                         f"| {fmt(r['ratio'], 3)} | {mm(r['ddlab_peak_memory_mb'])} | {mm(r['bare_peak_memory_mb'])} |")
        lines.append("")
    if result["sampling"]:
        r0 = result["sampling"][0]
        lines += [(f"**Sampling** (batch {r0['batch_size']}, image {tuple(r0['image_shape'])}, {' '.join(r0['model_overrides']) or 'default model'}; "
                  f"{st.get('sample_repeats', st['repeats'])} repeats; "
                  "ratio = ddlab img/s / diffusers img/s; guidance cost = time with / without guidance; ddlab guided rows use "
                  "`guidance_batching=auto`, and both of its modes are timed: one forward of twice the batch (joint) or two forwards (split))"), "",
                  "| sampler | steps | guidance | ddlab img/s | diffusers img/s | ddlab / diffusers | guidance cost (auto) | joint | split | diffusers |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["sampling"]:
            guided = r["guidance_scale"] != 1.0
            gc = f"{fmt(r['guidance_cost'], 2)} ({r.get('guidance_batching', 'joint')})" if guided else "-"
            extra_cols = " | ".join(fmt(r[k], 2) if guided and k in r else "-"
                                    for k in ("guidance_cost_joint", "guidance_cost_split", "diffusers_guidance_cost"))
            lines.append(f"| {r['kind']} | {r['steps']} | {r['guidance_scale']:g} | {fmt(r['ddlab_images_per_s'], 2)} | "
                         f"{fmt(r['diffusers_images_per_s'], 2)} | {fmt(r['ratio'], 3)} | {gc} | {extra_cols} |")
        lines.append("")
    if result["data"]:
        lines += ["**Data loading** (delivered by the DataModule's train loader vs consumed by the ddlab training step at the same shape and batch)", "",
                  "| data | batch | workers | delivered img/s | first batch s | train step img/s | data-bound |", "|---|---|---|---|---|---|---|"]
        for r in result["data"]:
            lines.append(f"| {r['data']} | {r['batch_size']} | {r['num_workers']} | {fmt(r['delivered_images_per_s'], 0)} | "
                         f"{fmt(r['first_batch_s'], 2)} | {fmt(r['train_step_images_per_s'])} | {'yes' if r['data_bound'] else 'no'} |")
        lines.append("")
    if result["scaling"]:
        lines += ["**Scaling** (time per training step, bare loop doing ddlab's work, default model)", "",
                  "| axis | variant | px | batch | step ms | ms / image |", "|---|---|---|---|---|---|"]
        for r in result["scaling"]:
            lines.append(f"| {r['axis']} | {r['variant']} | {r['image_size']} | {r['batch_size']} | {fmt(r['step_ms'])} | {r['ms_per_image']:.2f} |")
        lines.append("")
    if isinstance(result.get("presets"), list) and result["presets"]:
        keys = list(result["presets"][0].keys())
        lines += ["**Presets** (`benchmarks.presets.run_presets`)", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in result["presets"]:
            lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
        lines.append("")
    if result["notes"]:
        lines += ["Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "median" in v:
        return fmt(v, 2)
    return str(v)


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


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


def main(argv=None) -> dict:
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

    if "train" in sections:
        result["train"] = bench_train(s, dev, memory=not args.no_memory, notes=notes)
        save()
    if "sampling" in sections:
        result["sampling"] = bench_sampling(s, dev, notes)
        save()
    if "data" in sections:
        result["data"] = bench_data(s, dev, notes)
        save()
    if "scaling" in sections:
        result["scaling"] = bench_scaling(s, dev, notes)
        save()
    if "presets" in sections:
        if args.quick:
            notes.append("presets: run_presets is not called under --quick")
        else:
            result["presets"] = bench_presets(s, notes)
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
