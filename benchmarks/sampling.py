"""Sampling section of ``benchmarks.run``: ddlab's samplers (DDIM, DDPM, with and without
guidance) versus a loop over diffusers' schedulers calling the same network the same way."""

from __future__ import annotations

import torch

from benchmarks.common import compose, fmt, now, stats, table
from benchmarks.common import progress as _progress


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

    from ddlab.diffusion import resolve_guidance_batching, samplers

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
        _progress(f"sampling {kind} {steps} steps, batch {b}")

        def ddlab_fn(n_steps, scale, batching="auto", kind=kind):
            sampler = getattr(samplers, kind)(steps=n_steps, spacing="trailing", clip_x0=True, guidance_scale=scale,
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
        times = _time_impls(impls, steps, s["sample_repeats"], dev)
        auto = resolve_guidance_batching("auto", dev)
        times[("ddlab", w)] = times[(f"ddlab_{auto}", w)]
        for scale in (1.0, w):
            row = {"kind": kind, "steps": steps, "batch_size": b, "guidance_scale": scale, "model_overrides": extra,
                   "image_shape": list(shape[1:]), **_row_stats(times, scale, b)}
            if scale != 1.0:
                row["guidance_batching"] = auto  # what the default (`auto`) ran; both are timed
            rows.append(row)
    return rows


def _time_impls(impls: dict, steps: int, repeats: int, dev: torch.device) -> dict:
    """``{(impl, scale): [seconds per run]}``; implementations alternate order repeat by repeat."""
    with torch.inference_mode():
        for scale, fns in impls.items():  # warm-up: a few steps of each, same shapes
            for _, fn in fns:
                fn(min(2, steps), scale)
        times = {(impl, scale): [] for scale, fns in impls.items() for impl, _ in fns}
        for r in range(repeats):
            for scale, order in impls.items():
                for impl, fn in (order if r % 2 == 0 else order[::-1]):
                    t0 = now(dev)
                    fn(steps, scale)
                    times[(impl, scale)].append(now(dev) - t0)
    return times


def _row_stats(times: dict, scale: float, b: int) -> dict:
    base = times[("ddlab", 1.0)]
    dl, df = times[("ddlab", scale)], times[("diffusers", scale)]
    row = {
        "ddlab_images_per_s": stats(b / t for t in dl), "diffusers_images_per_s": stats(b / t for t in df),
        "ratio": stats(a / c for a, c in zip(df, dl)),  # ddlab images/s over diffusers images/s
        "guidance_cost": stats(a / c for a, c in zip(dl, base)),  # time with / without guidance
    }
    if scale != 1.0:
        for mode in ("joint", "split"):
            row[f"guidance_cost_{mode}"] = stats(a / c for a, c in zip(times[(f"ddlab_{mode}", scale)], base))
        row["diffusers_guidance_cost"] = stats(a / c for a, c in zip(df, times[("diffusers", 1.0)]))
    return row


def markdown(rows: list[dict], st: dict) -> list[str]:
    r0 = rows[0]
    caption = (f"**Sampling** (batch {r0['batch_size']}, image {tuple(r0['image_shape'])}, {' '.join(r0['model_overrides']) or 'default model'}; "
               f"{st.get('sample_repeats', st['repeats'])} repeats; "
               "ratio = ddlab img/s / diffusers img/s; guidance cost = time with / without guidance; ddlab guided rows use "
               "`guidance_batching=auto`, and both of its modes are timed: one forward of twice the batch (joint) or two forwards (split))")
    out = []
    for r in rows:
        guided = r["guidance_scale"] != 1.0
        gc = f"{fmt(r['guidance_cost'], 2)} ({r.get('guidance_batching', 'joint')})" if guided else "-"
        extra = [fmt(r[k], 2) if guided and k in r else "-" for k in ("guidance_cost_joint", "guidance_cost_split", "diffusers_guidance_cost")]
        out.append([r["kind"], r["steps"], f"{r['guidance_scale']:g}", fmt(r["ddlab_images_per_s"], 2),
                    fmt(r["diffusers_images_per_s"], 2), fmt(r["ratio"], 3), gc, *extra])
    return table(caption, ["sampler", "steps", "guidance", "ddlab img/s", "diffusers img/s", "ddlab / diffusers",
                           "guidance cost (auto)", "joint", "split", "diffusers"], out)
