"""Guided sampling speed: ddlab's DDIM and DPM-Solver++(2M) with ``joint`` and ``split`` guidance
batching against a diffusers scheduler loop around the same network. The faster batching on the
device is what ``guidance_batching: auto`` should pick there."""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from benchmarks.common import compose, now

from .budget import OverBudget, Section

BATCHINGS = ("joint", "split")


def _overrides(s: dict) -> list[str]:
    return ["experiment=mnist_cfg"] + (["model.base_channels=8"] if s["quick"] else [])


def make_sampler(s: dict, name: str, steps: int, w: float, batching: str):
    """The sampler exactly as a run composes it: the real ``configs/sampler/<name>.yaml`` with overrides."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    cfg = compose(_overrides(s) + [f"sampler={name}", f"sampler.steps={steps}", f"sampler.guidance_scale={w}",
                                   f"sampler.guidance_batching={batching}"])
    if "progress" in cfg.sampler:
        with open_dict(cfg.sampler):
            cfg.sampler.progress = False
    return instantiate(cfg.sampler)


def diffusers_scheduler(name: str, scheduler_cfg):
    """diffusers' scheduler for the run's VP schedule and parameterisation."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[str(scheduler_cfg.prediction)]
    kw = dict(num_train_timesteps=int(scheduler_cfg.num_timesteps), prediction_type=pred, timestep_spacing="trailing")
    if scheduler_cfg.schedule == "cosine":
        kw["beta_schedule"] = "squaredcos_cap_v2"
    else:
        kw.update(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    if name == "ddim":
        return DDIMScheduler(clip_sample=True, set_alpha_to_one=True, **kw)
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
                                       lower_order_final=False, **kw)


def diffusers_loop(sch, model, steps: int, shape, y, w: float, generator, device) -> torch.Tensor:
    """The usual diffusers pipeline loop: conditional and unconditional halves in one forward."""
    sch.set_timesteps(steps, device=device)
    x = torch.randn(*shape, device=device, generator=generator) * sch.init_noise_sigma
    null = torch.full_like(y, int(model.num_classes))
    for t in sch.timesteps:
        tb = t.to(device=device, dtype=torch.long).expand(2 * shape[0])  # no host sync per step
        cond, uncond = model(torch.cat([x, x]), tb, torch.cat([y, null])).chunk(2)
        x = sch.step(uncond + w * (cond - uncond), t, x).prev_sample
    return x


def _time(fn: Callable[[], object], device) -> float:
    t0 = now(device)
    fn()
    return now(device) - t0


def bench_one(s: dict, sec: Section, name: str, steps: int, model, diffusion, scheduler_cfg) -> dict:
    dev, b, w = s["device"], s["sample_batch"], s["guidance_scale"]
    shape = (b, model.in_channels, model.image_size, model.image_size)
    y = (torch.arange(b) % 10).to(dev)
    samplers = {m: make_sampler(s, name, steps, w, m) for m in BATCHINGS}
    sch = diffusers_scheduler(name, scheduler_cfg)

    def gen():
        return torch.Generator(device=dev).manual_seed(0)

    impls = {f"ddlab_{m}": (lambda m=m: samplers[m].sample(model, diffusion, shape, y=y, generator=gen(), guidance_scale=w))
             for m in BATCHINGS}
    impls["diffusers"] = lambda: diffusers_loop(sch, model, steps, shape, y, w, gen(), dev)
    times: dict = {k: [] for k in impls}
    with torch.inference_mode():
        for k, fn in impls.items():  # warm-up (cuDNN autotuning, allocator)
            sec.check(f"{name} warm-up {k}")
            fn()
        for r in range(s["sample_repeats"]):
            for k, fn in (list(impls.items()) if r % 2 == 0 else list(impls.items())[::-1]):
                sec.check(f"{name} {k} repeat {r}")
                times[k].append(_time(fn, dev))
    ips = {k: b / statistics.median(v) for k, v in times.items()}
    faster = max(BATCHINGS, key=lambda m: ips[f"ddlab_{m}"])
    return {"sampler": name, "steps": steps, "batch": b, "guidance_scale": w, "images_per_s": ips,
            "seconds": {k: statistics.median(v) for k, v in times.items()}, "faster_batching": faster,
            "ddlab_best_over_diffusers": ips[f"ddlab_{faster}"] / ips["diffusers"]}


def sampling(s: dict, sec: Section) -> dict:
    from hydra.utils import instantiate

    try:
        import diffusers  # noqa: F401
    except ImportError:
        sec.note("diffusers is not installed (pip install -e '.[bench]'): sampling comparison skipped")
        return {"rows": []}
    cfg = compose(_overrides(s))
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(s["device"]).eval()
    diffusion = instantiate(cfg.scheduler)
    rows = []
    for name, steps in s["samplers"]:
        try:
            rows.append(bench_one(s, sec, name, steps, model, diffusion, cfg.scheduler))
        except OverBudget as e:
            sec.note(str(e))
            break
    out: dict = {"rows": rows}
    try:
        from ddlab.diffusion.sampling import resolve_guidance_batching

        out["auto_resolves_to"] = resolve_guidance_batching("auto", s["device"])
    except (ImportError, TypeError, ValueError):
        pass
    if rows:  # over all the samplers timed: the batching with less total time
        total = {m: sum(r["seconds"][f"ddlab_{m}"] for r in rows) for m in BATCHINGS}
        out["measured_faster"] = min(BATCHINGS, key=total.get)
    return out
