"""The evaluation core shared by ``ddlab.sample``, ``ddlab.fid``, ``ddlab.nll`` and the training
callbacks (``SampleGrid``, ``FIDCallback``, ``BitsPerDim``).

It sets up the runtime (device, threads), rebuilds a run's sampler from the config stored in its
checkpoint with command-line overrides, draws seeded samples in batches, writes grids and
``samples.npz``, and evaluates bits/dim. Scoring is :class:`ddlab.metrics.Evaluator`.

Seeding rules, the same in every command and callback (so the same seed gives the same images
whichever draws them):

- labels: with no labels given, a class-conditional model gets every class ``n // K`` or
  ``n // K + 1`` times, in an order shuffled by a CPU generator seeded with ``seed``;
- the starting noise ``x_T`` of image ``i`` comes from its own generator, seeded by
  ``stream_seed(seed, i, "noise")``; so deterministic samplers give the same image ``i`` for any
  batch size or split across DDP ranks;
- the noise a stochastic sampler draws during its steps comes from one generator per batch, seeded
  by ``stream_seed(seed, start, "steps")`` (``start`` = index of the batch's first image);
- bits/dim: the forward-process noise of data image ``i`` comes from ``stream_seed(seed, i, "bpd")``;
  the result does not depend on the batch size or on the split across ranks. The global RNG is
  never touched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

log = logging.getLogger("ddlab.evaluation")

# improved-diffusion's NLL evaluation (scripts/image_nll.py, `clip_denoised=True`) clips the predicted
# x0 to [-1, 1] inside the bound; every bits/dim in ddlab uses this default.
CLIP_X0 = True
_STREAMS = {"noise": 0, "steps": 1, "bpd": 2}


# ----------------------------------------------------------------------------- runtime
def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device(name)``."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_runtime(device: str = "auto", torch_threads: Optional[int] = None, runtime: Optional[Mapping] = None) -> torch.device:
    """Set the torch CPU threads (when given), apply the GPU settings of the ``runtime:`` config node
    (:func:`ddlab.runtime.apply`: TF32, SDPA backend; nothing off CUDA) and return the device to run on."""
    from ddlab import runtime as _runtime

    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    dev = resolve_device(device)
    _runtime.apply(**dict(runtime or {}), device=dev)
    return dev


def stream_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed for item ``index`` of ``stream`` (``noise``, ``steps``, ``bpd``) under ``seed``;
    distinct (seed, index, stream) triples give independent streams (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(index), _STREAMS[stream]]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_generator(seed: int, index: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(stream_seed(seed, index, stream))


# ----------------------------------------------------------------------------- model
def model_source(ckpt: Optional[str], pretrained: Optional[str], required: bool = True) -> Optional[str]:
    """The ``key=value`` that names the model to evaluate; exactly one of ``ckpt`` / ``pretrained``."""
    if ckpt is not None and pretrained is not None:
        raise ValueError(f"give either ckpt={ckpt} or pretrained={pretrained}, not both")
    if ckpt is None and pretrained is None:
        if required:
            raise ValueError("no model: give ckpt=path/to/last.ckpt (a training checkpoint) or pretrained=DIR_or_user/repo "
                             "(a folder written by `python -m ddlab.export`, or a Hugging Face Hub repo)")
        return None
    return f"ckpt={ckpt}" if ckpt is not None else f"pretrained={pretrained}"


def load_model(ckpt: Optional[str], pretrained: Optional[str], ema: bool = True, device=None):
    """The network (``ema`` weights by default), formulation and run config of a training checkpoint
    (``ckpt=``) or an exported folder / Hub repo (``pretrained=``), as a
    :class:`ddlab.checkpoint.LoadedCheckpoint`."""
    model_source(ckpt, pretrained)
    if pretrained is not None:
        from ddlab.hub import load_pretrained_checkpoint

        return load_pretrained_checkpoint(pretrained, use_ema=ema, device=device)
    from ddlab.checkpoint import load_checkpoint

    return load_checkpoint(ckpt, use_ema=ema, device=device)


# ----------------------------------------------------------------------------- sampler
def _drop_nulls(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _drop_nulls(v) for k, v in node.items() if v is not None}
    return node


def _current_form(stored: Optional[Mapping]) -> dict:
    """A stored sampler config as today's builders take it: checkpoints written before samplers had
    their own builders store ``_target_: ddlab.diffusion.Sampler`` with ``kind``, which is mapped;
    any other config (``sampler=diffusers``, a user's sampler) is kept as is."""
    if stored and str(stored.get("_target_", "")) == "ddlab.diffusion.Sampler":
        from ddlab.diffusion.samplers import sampler_config as builder_form

        return builder_form(stored)
    return dict(stored or {})


def sampler_config(stored: Optional[Mapping], overrides: Optional[Mapping] = None) -> dict:
    """The sampler config to use: the run's ``stored`` config merged (OmegaConf) with the non-null
    ``overrides``. Overrides that name another ``_target_`` (``sampler=<name>`` on the command line)
    replace the stored config instead, since its keys belong to another sampler."""
    from omegaconf import OmegaConf

    over = OmegaConf.to_container(OmegaConf.create(dict(overrides or {})), resolve=True)
    over = _drop_nulls(over)
    stored = _current_form(stored)
    if "_target_" in over and over["_target_"] != stored.get("_target_"):
        stored = {}
    if "_target_" not in stored and "_target_" not in over:
        raise ValueError("no sampler: the checkpoint stores none; choose one with sampler=<name> (e.g. sampler=ddim)")
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(stored), OmegaConf.create(over)), resolve=True)


def build_sampler(cfg: Mapping, progress: bool = False):
    """Instantiate a sampler config; its own progress bar follows ``progress``."""
    from hydra.utils import instantiate

    sampler = instantiate(dict(cfg))
    sampler.progress = bool(progress)
    return sampler


def sampler_name(sampler, cfg: Mapping) -> str:
    """The sampler's ``name`` if it has one, else its ``kind``, else the short name of its ``_target_``."""
    return (getattr(sampler, "name", None) or getattr(sampler, "kind", None) or cfg.get("kind")
            or str(cfg.get("_target_", type(sampler).__name__)).rsplit(".", 1)[-1])


def describe_sampler(sampler, cfg: Mapping, guidance_scale: float, diffusion=None) -> dict:
    """The sampler settings for records and logs: its name, its config keys, steps and guidance used,
    and its NFE (on ``diffusion`` when given: the count can depend on the process, e.g. with a
    ``guidance_interval``)."""
    settings = {k: v for k, v in cfg.items() if k not in ("_target_", "progress")}
    settings.update(name=sampler_name(sampler, cfg), target=cfg.get("_target_"), steps=getattr(sampler, "steps", None),
                    guidance_scale=float(guidance_scale))
    nfe = getattr(sampler, "nfe", None)
    if callable(nfe):
        guided = guidance_scale != 1.0
        settings["nfe"] = sampler_nfe(sampler, guided, diffusion) if diffusion is not None else nfe(guided)
    return settings


def resolve_guidance(sampler, num_classes: int, overridden: bool = False) -> float:
    """The guidance weight to sample with: the sampler's for class-conditional models, 1 for
    unconditional ones (an explicit ``sampler.guidance_scale != 1`` on those is an error)."""
    w = float(sampler.guidance_scale)
    if num_classes > 0:
        return w
    if overridden and w != 1.0:
        raise ValueError(f"sampler.guidance_scale={w}: this model was trained without labels (model.num_classes=0), "
                         "so classifier-free guidance is not available; leave sampler.guidance_scale unset or 1")
    return 1.0


def run_sampler(stored: Optional[Mapping], overrides: Optional[Mapping], num_classes: int):
    """The run's sampler with the command line's ``sampler.*`` overrides (its own bar off: the caller
    shows one over the images): returns ``(sampler, config, guidance_scale)``."""
    cfg = sampler_config(stored, overrides)
    sampler = build_sampler(cfg, progress=False)
    w = resolve_guidance(sampler, num_classes, overridden=(overrides or {}).get("guidance_scale") is not None)
    return sampler, cfg, w


def sampler_names() -> list[str]:
    """The samplers ``sampler=<name>`` can name: the files of ddlab's ``configs/sampler/``."""
    from ddlab.config import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / "sampler").glob("*.yaml"))


def named_sampler_config(stored: Optional[Mapping], name: str, overrides: Optional[Mapping] = None) -> dict:
    """The config of sampler ``name`` (``configs/sampler/<name>.yaml``) for a run whose checkpoint
    stores ``stored``: the stored config itself when it is that sampler, else the file's settings
    with the stored values of the keys both take (guidance, its batching, clipping, ...); then the
    non-null ``overrides`` merged as in :func:`sampler_config`. Comparing samplers on one run this way
    keeps the run's guidance unless it is overridden."""
    from omegaconf import OmegaConf

    from ddlab.config import CONFIG_DIR

    names = sampler_names()
    if name not in names:
        raise ValueError(f"sampler: unknown sampler {name!r}; choose from {', '.join(names)}")
    base = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "sampler" / f"{name}.yaml"), resolve=True)
    if stored:
        old = _current_form(stored)
        if old.get("_target_") == base["_target_"]:
            base = old
        else:
            base.update({k: v for k, v in old.items() if k in base and k != "_target_"})
    return sampler_config(base, overrides)


def sampler_nfe(sampler, guided: bool, diffusion) -> int:
    """Network forwards per image of one ``sampler.sample`` call on ``diffusion`` (guidance's extra
    forward counted when ``guided``); a sampler that cannot run on this formulation (a discrete-timestep
    sampler on EDM, say) is refused with a ValueError, before anything is sampled."""
    import inspect

    if "diffusion" in inspect.signature(sampler.nfe).parameters:
        return int(sampler.nfe(guided, diffusion=diffusion))
    if not hasattr(diffusion, "alphas_cumprod"):  # diffusers' schedulers step discrete VP timesteps
        raise ValueError(f"sampler {sampler_name(sampler, {})!r} needs a discrete VP process (GaussianDiffusion), which "
                         f"{type(diffusion).__name__} is not; use a sigma-space sampler (euler, heun, dpmpp_2m_sigma, ...)")
    return int(sampler.nfe(guided))


# ----------------------------------------------------------------------------- labels and drawing
def balanced_labels(n: int, num_classes: int, seed: int = 0) -> Optional[torch.Tensor]:
    """``(n,)`` int64 labels with every class ``n // K`` or ``n // K + 1`` times, in an order shuffled
    by a CPU generator seeded with ``seed``; ``None`` for unconditional models (``num_classes == 0``)."""
    if num_classes <= 0:
        return None
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))]


def make_labels(labels: Optional[Sequence[int] | int], n: int, num_classes: int, seed: int = 0) -> Optional[torch.Tensor]:
    """``(n,)`` int64 labels: the given list (one per image, or shorter and cycled), balanced shuffled
    classes (:func:`balanced_labels`) when ``labels`` is None, and None for an unconditional model."""
    if labels is None:
        return balanced_labels(n, num_classes, seed)
    labels = [int(v) for v in ([labels] if isinstance(labels, int) else labels)]
    if num_classes == 0:
        raise ValueError(f"labels={labels}: this model was trained without labels (model.num_classes=0); use labels=null")
    if not labels or len(labels) > n:
        raise ValueError(f"labels: give between 1 and n={n} labels (one per image, or a shorter list that is cycled), got {len(labels)}")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"labels: {bad} outside [0, {num_classes - 1}] (the model has {num_classes} classes)")
    return torch.tensor(labels * math.ceil(n / len(labels)), dtype=torch.long)[:n]


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, C)`` uint8 (nearest of 256 levels)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate_uint8(model: nn.Module, diffusion, sampler, n: int, batch_size: int, labels: Optional[torch.Tensor] = None,
                   guidance_scale: Optional[float] = None, seed: int = 0, progress: bool = False, desc: str = "sampling",
                   first_index: int = 0) -> np.ndarray:
    """``n`` samples of ``model`` as ``(n, H, W, C)`` uint8, drawn in batches of ``batch_size`` with
    the seeding rules of this module. ``labels``: ``(n,)`` or None; ``guidance_scale`` None keeps the
    sampler's. ``first_index``: the global index of the first image (a DDP rank's share starts there)."""
    from tqdm.auto import tqdm

    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive integers, got n={n}, batch_size={batch_size}")
    device = next(model.parameters()).device
    shape = (model.in_channels, model.image_size, model.image_size)
    if labels is None:
        guidance_scale = 1.0  # unconditional samples: no guidance
    out = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            b, first = min(batch_size, n - start), first_index + start
            noise = torch.stack([torch.randn(shape, device=device, generator=make_generator(seed, first + j, "noise", device))
                                 for j in range(b)])
            y = labels[start:start + b].to(device) if labels is not None else None
            x = sampler.sample(model, diffusion, (b, *shape), y=y, noise=noise,
                               generator=make_generator(seed, first, "steps", device), guidance_scale=guidance_scale)
            out.append(to_uint8_nhwc(x))
            bar.update(b)
    return np.concatenate(out)


def save_grid(images: np.ndarray, path: str | Path, nrow: Optional[int] = None) -> Path:
    """Write uint8 ``(N, H, W, C)`` images as one PNG grid (``nrow`` columns, default ``ceil(sqrt(N))``)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    save_image(x, path, nrow=int(nrow) if nrow else max(1, math.ceil(math.sqrt(len(x)))), padding=2)
    return path


def save_samples(out_dir: str | Path, images: np.ndarray, labels: Optional[torch.Tensor | np.ndarray],
                 nrow: Optional[int] = None, grid_limit: Optional[int] = None) -> dict:
    """Write ``samples.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels, -1 = unconditional) and
    ``grid.png`` (the first ``grid_limit`` images, all by default) to ``out_dir``."""
    from ddlab.metrics import save_samples_npz

    out = Path(out_dir)
    lab = np.full(len(images), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    npz = save_samples_npz(out / "samples.npz", images, lab)
    grid = save_grid(images[:grid_limit] if grid_limit else images, out / "grid.png", nrow)
    return {"npz": npz, "grid": grid, "labels": lab}


# ----------------------------------------------------------------------------- bits/dim
BPD_TERMS = {"bpd": "total_bpd", "bpd_prior": "prior_bpd", "bpd_decoder": "decoder_bpd", "bpd_vb": "vb_sum"}


@torch.no_grad()
def bits_per_dim(model: nn.Module, diffusion, dataset, indices: Sequence[int], batch_size: int = 64, seed: int = 0,
                 clip_x0: bool = CLIP_X0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-image variational bound in bits/dim (Ho et al. 2020 eq. 5) of the data-set images at
    ``indices`` (``(x in [-1, 1], y)`` items; class-conditional models get the true labels):
    ``{"bpd", "bpd_prior", "bpd_decoder", "bpd_vb"}``, each ``(len(indices),)`` float64 on the CPU.
    T network calls per batch; noise per image from :func:`stream_seed` (``bpd`` stream)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"bits/dim batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    conditional = int(getattr(model, "num_classes", 0)) > 0
    indices = [int(i) for i in indices]
    terms: dict[str, list] = {k: [] for k in BPD_TERMS}
    for start in tqdm(range(0, len(indices), batch_size), desc="bits/dim", unit="batch", disable=not progress, leave=False):
        chunk = indices[start:start + batch_size]
        items = [dataset[i] for i in chunk]
        x = torch.stack([it[0] for it in items]).to(device)
        y = torch.as_tensor([int(it[1]) for it in items], device=device) if conditional else None
        gens = [make_generator(seed, i, "bpd", device) for i in chunk]
        out = diffusion.calc_bpd_loop(model, x, y, clip_x0=clip_x0, generator=gens)
        for k, src in BPD_TERMS.items():
            terms[k].append(out[src].double().cpu())
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for k, v in terms.items()}


def summarize_bpd(terms: Mapping[str, torch.Tensor], clip_x0: bool = CLIP_X0) -> dict:
    """Means of :func:`bits_per_dim`'s terms, the standard error of ``bpd`` and the image count."""
    n = len(terms["bpd"])
    rec = {k: float(v.mean()) for k, v in terms.items()}
    rec["bpd_stderr"] = float(terms["bpd"].std() / math.sqrt(n)) if n > 1 else float("nan")
    rec.update(bpd_n=n, bpd_clip_x0=bool(clip_x0))
    return rec


# ----------------------------------------------------------------------------- data
def data_config(data: Optional[Mapping], run_cfg: Optional[Mapping], data_dir: Optional[str] = None,
                val_limit: Optional[int] = None) -> Optional[dict]:
    """The held-out data config: ``data`` (``data=<name>``) if given, else the training run's, with
    ``data_dir`` (where the files are on this machine) and ``val_limit`` (images of the val split) applied."""
    if data is not None:
        out = dict(data)
    elif run_cfg is not None and run_cfg.get("data") is not None:
        out = dict(run_cfg["data"])
    else:
        return None
    if data_dir is not None and "data_dir" in out:
        out["data_dir"] = str(data_dir)
    out["val_limit"] = val_limit
    out["limit"] = None  # else an unset val_limit falls back to the training run's data.limit
    return out
