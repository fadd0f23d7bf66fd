"""ddlab models out to diffusers: a ``model=diffusers_unet2d`` run as a standard pipeline folder.

``python -m ddlab.export ckpt=... out=DIR format=diffusers [pipeline=ddim]`` writes what
``DDPMPipeline.save_pretrained`` / ``DDIMPipeline.save_pretrained`` write (``model_index.json``,
``unet/``, ``scheduler/``): the wrapped ``UNet2DModel`` (the ddlab model's ``.unet``) and a
``DDPMScheduler`` / ``DDIMScheduler`` configured from the run's own schedule (trained betas,
prediction type, spacing, x0 clipping), so ``DDPMPipeline.from_pretrained(DIR)()`` samples the model
without ddlab.

Only unconditional models: diffusers ships no standard class-conditional pixel-space pipeline
(``DDPMPipeline`` never passes ``class_labels``), so conditional models are refused; share them with
``format=ddlab``. Learned-variance models export with ``variance_type=learned_range`` for DDPM; DDIM,
which has no use for the variance, refuses them (export ``pipeline=ddpm``).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional

from torch import nn

from ddlab.diffusion import GaussianDiffusion
from ddlab.interop.schedulers import scheduler_config

PIPELINES = {"ddpm": ("DDPMPipeline", "DDPMScheduler"), "ddim": ("DDIMPipeline", "DDIMScheduler")}


def export_diffusers(model: nn.Module, diffusion: GaussianDiffusion, out: str | os.PathLike, pipeline: str = "ddpm",
                     sampler_config: Optional[dict] = None) -> Path:
    """Save ``model.unet`` with a matching scheduler as a diffusers pipeline folder."""
    import diffusers

    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline: unknown value {pipeline!r}; choose from {', '.join(PIPELINES)}")
    unet = getattr(model, "unet", None)
    if not isinstance(unet, diffusers.UNet2DModel):
        raise ValueError(f"format=diffusers exports diffusers UNets only: this model is {type(model).__name__}, not a "
                         "model=diffusers_unet2d wrapper around a UNet2DModel; export it with format=ddlab")
    if int(getattr(model, "num_classes", 0)):
        raise ValueError(f"format=diffusers: this model is class-conditional ({model.num_classes} classes) and diffusers has no "
                         "standard class-conditional pixel pipeline (DDPMPipeline/DDIMPipeline pass no labels); "
                         "export it with format=ddlab")
    sampler_config = sampler_config or {}
    sched_cfg = scheduler_config(diffusion, str(sampler_config.get("spacing", "trailing")))
    sched_cfg["clip_sample"] = bool(sampler_config.get("clip_x0", True))
    if diffusion.variance == "learned_range":
        if pipeline == "ddim":
            raise ValueError("pipeline=ddim: this model learns its variance (2C outputs), which DDIMScheduler cannot read; "
                             "use pipeline=ddpm")
        sched_cfg["variance_type"] = "learned_range"
    pipe_name, sched_name = PIPELINES[pipeline]
    sched_cls = getattr(diffusers, sched_name)
    accepted = set(inspect.signature(sched_cls.__init__).parameters)
    scheduler = sched_cls.from_config({k: v for k, v in sched_cfg.items() if k in accepted})
    out = Path(out)
    getattr(diffusers, pipe_name)(unet=unet, scheduler=scheduler).save_pretrained(str(out))
    (out / "README.md").write_text(
        "---\nlibrary_name: diffusers\ntags: [ddlab, diffusion, unconditional-image-generation]\n---\n\n"
        f"# {pipe_name} exported from ddlab\n\n```python\nfrom diffusers import {pipe_name}\n"
        f'pipe = {pipe_name}.from_pretrained("path/to/this/folder")\nimages = pipe(batch_size=16).images\n```\n'
    )
    return out


def export_diffusers_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, pipeline: str = "ddpm", ema: bool = True) -> Path:
    """A ddlab checkpoint of a ``model=diffusers_unet2d`` run -> a diffusers pipeline folder."""
    from ddlab.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, use_ema=ema)
    return export_diffusers(loaded.model, loaded.diffusion, out, pipeline, loaded.config.get("sampler"))
