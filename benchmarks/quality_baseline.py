"""The diffusers baseline of ``python -m benchmarks.quality``: class-conditional MNIST with ``UNet2DModel``,
``DDPMScheduler`` and ``EMAModel``, trained for a wall-clock budget and sampled with guided ``DDIMScheduler``.

Kept apart from the driver (:mod:`benchmarks.quality`) so each module stays under the 400-line rule.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

NULL_CLASS = 10


def _progress(msg: str) -> None:
    print(f"[bench-quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mnist_28(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ddlab.data.mnist import load_mnist

    x, y = load_mnist(data_dir, split)
    return torch.from_numpy(np.array(x)).float().div(127.5).sub(1.0)[:, None], torch.from_numpy(np.array(y)).long()


def baseline_model(width: tuple[int, ...] = (32, 64, 64)):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=tuple(width),
                       down_block_types=("DownBlock2D",) * len(width), up_block_types=("UpBlock2D",) * len(width),
                       norm_num_groups=8, num_class_embeds=NULL_CLASS + 1)


def train_baseline(budget: float, data_dir: str, lr: float = 2e-3, batch_size: int = 64, width=(32, 64, 64),
                   ema_power: float = 2 / 3, warmup: int = 100, p_uncond: float = 0.1, seed: int = 0) -> dict:
    """diffusers' class-conditional DDPM recipe, trained until ``budget`` seconds have passed."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = mnist_28(data_dir, "train")
    model = baseline_model(width)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=warmup)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=ema_power)
    model.train()
    steps, t0 = 0, time.perf_counter()
    deadline = t0 + budget
    perm, pos = torch.randperm(len(x), generator=g), 0
    while time.perf_counter() < deadline:
        if pos + batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(len(idx), generator=g) < p_uncond] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        pred = model(noise_sched.add_noise(x0, noise, t), t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(model.parameters())
        steps += 1
        if steps % 200 == 0:
            _progress(f"baseline step {steps}, loss {loss.item():.4f}, {time.perf_counter() - t0:.0f}/{budget:.0f} s")
    seconds = time.perf_counter() - t0
    ema.copy_to(model.parameters())
    model.eval()
    return {"model": model, "scheduler_config": dict(noise_sched.config), "steps": steps, "batch_size": batch_size,
            "images_per_s": steps * batch_size / seconds, "params": sum(p.numel() for p in model.parameters()),
            "settings": {"lr": lr, "batch_size": batch_size, "width": list(width), "ema_power": ema_power, "warmup": warmup}}


@torch.no_grad()
def sample_baseline(model, scheduler_config: dict, n: int, steps: int, guidance: float, seed: int, batch_size: int):
    """Guided DDIM with diffusers' ``DDIMScheduler``; conditional and unconditional passes in one forward
    (``guidance=1``: the conditional pass alone)."""
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    from ddlab.evaluation import balanced_labels

    sched = DDIMScheduler.from_config(scheduler_config)
    labels = balanced_labels(n, NULL_CLASS, seed)
    out = []
    t0 = time.perf_counter()
    for i, start in enumerate(tqdm(range(0, n, batch_size), desc=f"baseline ddim-{steps}", leave=False)):
        y = labels[start:start + batch_size]
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn((len(y), 1, 28, 28), generator=g)
        sched.set_timesteps(steps)
        null = torch.full_like(y, NULL_CLASS)
        for t in sched.timesteps:
            if guidance == 1.0:  # plain conditional sampling: one pass, as a diffusers user would run it
                eps = model(x, t, class_labels=y).sample
            else:
                eps_c, eps_u = model(torch.cat([x, x]), t, class_labels=torch.cat([y, null])).sample.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out), labels.numpy(), {"sampling_seconds": time.perf_counter() - t0,
                                                  "sampler": {"kind": "ddim", "steps": steps, "eta": 0.0, "guidance_scale": guidance}}
