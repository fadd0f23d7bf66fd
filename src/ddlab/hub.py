"""Share trained models: export a self-describing folder, load it back, push it to the Hugging Face Hub.

An exported folder holds

* ``model.safetensors`` - the network's weights (EMA by default), written with ``safetensors``;
* ``config.json`` - the ``model``, ``scheduler`` (diffusion) and ``sampler`` configs of the run as
  stored in the checkpoint, the ddlab version, global step, which weights, recorded metrics and the
  run config (``run_config``, without machine paths);
* ``README.md`` - a model card: sample grid, metrics, training config and the lines that load and sample;
* ``samples.png`` - a grid drawn with the checkpoint's own sampler;
* ``manifest.json`` - the sha256 of every other file; :func:`load_pretrained` refuses a folder whose
  files are missing or altered, naming the file.

``load_pretrained("DIR" or "user/repo")`` rebuilds model (eval mode), diffusion and sampler; a Hub id is
fetched with ``huggingface_hub.snapshot_download``. :func:`push_to_hub` uploads a folder with
``HfApi().create_repo`` + ``upload_folder``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ddlab.checkpoint import LoadedCheckpoint

WEIGHTS, CONFIG, CARD, GRID, MANIFEST = "model.safetensors", "config.json", "README.md", "samples.png", "manifest.json"
FORMAT_VERSION = 1
_DROPPED_RUN_KEYS = ("paths", "hydra")  # machine-specific folders; not part of the model


@dataclass
class Pretrained(LoadedCheckpoint):
    """What :func:`load_pretrained` returns: the fields of :class:`ddlab.checkpoint.LoadedCheckpoint`
    (``model`` in eval mode, ``diffusion``, ``config`` = the run config, ``global_step``, ``path`` = the
    folder, ``ema``) plus the run's ``sampler`` and the export's ``metrics``."""

    sampler: Any = None
    metrics: Optional[dict] = None

    @torch.no_grad()
    def sample(self, n: int = 16, labels=None, seed: int = 0, guidance_scale: Optional[float] = None) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)`` in [-1, 1] with the run's sampler. ``labels``: a list cycled
        over the ``n`` images (conditional models; default ``0, 1, ...``)."""
        return draw_samples(self.model, self.diffusion, self.sampler, n, labels, seed, guidance_scale)


def _version() -> str:
    from ddlab import __version__

    return __version__


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def draw_samples(model: nn.Module, diffusion, sampler, n: int, labels=None, seed: int = 0,
                 guidance_scale: Optional[float] = None) -> torch.Tensor:
    """Seeded samples from ``model``: labels ``0, 1, ..., K-1`` cycled (or ``labels``) for a
    conditional model with the sampler's guidance, none (and no guidance) for an unconditional one."""
    k = int(getattr(model, "num_classes", 0))
    device = next(model.parameters()).device
    y = None
    if k:
        base = list(labels) if labels is not None else list(range(k))
        y = torch.tensor([int(base[i % len(base)]) for i in range(n)], device=device)
    w = (sampler.guidance_scale if guidance_scale is None else float(guidance_scale)) if k else 1.0
    shape = (n, int(model.in_channels), int(model.image_size), int(model.image_size))
    g = torch.Generator(device=device).manual_seed(int(seed))
    return sampler.sample(model, diffusion, shape, y=y, generator=g, guidance_scale=w)


def _save_grid(images: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    nrow = max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    save_image((images.float().cpu() + 1) / 2, path, nrow=nrow, padding=2)


def export_model(model: nn.Module, run_config: dict, out: str | os.PathLike, *, global_step: int = 0, ema: bool = True,
                 metrics: Optional[dict] = None, grid_n: int = 16, seed: int = 0, source: Optional[str] = None) -> Path:
    """Write ``model`` (already holding the weights to share) and its run config as a ddlab folder.
    ``grid_n`` images are drawn with the run's sampler for the card (0: no grid)."""
    from hydra.utils import instantiate
    from safetensors.torch import save_model

    for key in ("model", "scheduler", "sampler"):
        if not run_config.get(key):
            raise ValueError(f"the run config has no `{key}` section, so the export could not rebuild the model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (WEIGHTS, CONFIG, CARD, GRID, MANIFEST))
    if foreign:
        raise FileExistsError(f"out={out} holds other files ({', '.join(foreign[:5])}); export into a new or empty folder "
                              "(an earlier export there is replaced)")
    for stale in (MANIFEST, GRID):
        (out / stale).unlink(missing_ok=True)
    was_training = model.training
    model.eval()
    save_model(model, str(out / WEIGHTS), metadata={"format": "pt", "ddlab_version": _version()})
    run = {k: v for k, v in run_config.items() if k not in _DROPPED_RUN_KEYS}
    config = {
        "library": "ddlab", "ddlab_version": _version(), "format_version": FORMAT_VERSION,
        "model": run["model"], "scheduler": run["scheduler"], "sampler": run["sampler"],
        "global_step": int(global_step), "ema": bool(ema), "metrics": metrics or {}, "source": source,
        "run_config": run,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False, default=str))
    if grid_n > 0:
        diffusion, sampler = instantiate(run["scheduler"]), instantiate(run["sampler"])
        sampler.progress = False
        _save_grid(draw_samples(model, diffusion, sampler, grid_n, seed=seed), out / GRID)
    (out / CARD).write_text(model_card(config, grid=(out / GRID).is_file()))
    model.train(was_training)
    write_manifest(out)
    return out


def model_card(config: dict, grid: bool = True, repo_id: Optional[str] = None) -> str:
    """The README.md of an export: what it is, the grid, how to load it, metrics, training config."""
    from omegaconf import OmegaConf

    m, d, s = config["model"], config["scheduler"], config["sampler"]
    k = int(m.get("num_classes", 0) or 0)
    kind = f"class-conditional ({k} classes, classifier-free guidance)" if k else "unconditional"
    where = repo_id or "path/to/this/folder"
    sampler_name = str(s.get("_target_", "")).rsplit(".", 1)[-1] + (f" ({s['kind']})" if "kind" in s else "")
    lines = [
        "---", "library_name: ddlab", "tags: [ddlab, diffusion, image-generation]", "---", "",
        f"# {config['run_config'].get('name', 'ddlab model')}", "",
        f"A {kind} pixel-space diffusion model trained with ddlab {config['ddlab_version']}: "
        f"`{m.get('_target_')}` at {m.get('image_size')} px, {config['global_step']} optimizer steps, "
        f"{'EMA' if config['ema'] else 'live (non-EMA)'} weights. Diffusion: {d.get('schedule')} schedule, "
        f"T = {d.get('num_timesteps')}, prediction `{d.get('prediction')}`, variance `{d.get('variance')}`. "
        f"Sampler: {sampler_name}, {s.get('steps')} steps.", "",
    ]
    if grid:
        lines += [f"![samples drawn with the run's sampler]({GRID})", ""]
    lines += ["## Load and sample", "", "```python", "import ddlab",
              f'pipe = ddlab.load_pretrained("{where}")  # model (eval mode), diffusion, sampler',
              "images = pipe.sample(16)  # (16, C, H, W) in [-1, 1]" + (", labels=[...] for classes" if k else ""),
              "```", "", f"or `python -m ddlab.sample pretrained={where} n=64`.", "", "## Metrics", ""]
    metrics = config.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {key} | {val:.6g} |" if isinstance(val, float) else f"| {key} | {val} |"
                                                      for key, val in sorted(metrics.items())]
    else:
        lines += ["No metrics were recorded for this run."]
    lines += ["", "## Training config", "", "```yaml", OmegaConf.to_yaml(OmegaConf.create(config["run_config"])).rstrip(), "```", ""]
    return "\n".join(lines)


def write_manifest(folder: Path) -> dict:
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST and ".cache" not in p.relative_to(folder).parts}
    manifest = {"algorithm": "sha256", "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_folder(folder: Path) -> None:
    """Refuse a folder with a missing manifest, or a listed file that is missing or altered."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; this is not a complete ddlab export (python -m ddlab.export ckpt=... out=...)")
    try:
        files = json.loads(mf.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"{mf} is not a valid ddlab manifest ({e}); export the model again") from e
    for name in (WEIGHTS, CONFIG):
        if name not in files:
            raise RuntimeError(f"{mf} does not list {name}; export the model again")
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"{folder}: {name} is missing (listed in {MANIFEST}); download or export the folder again")
        if sha256(p) != digest:
            raise RuntimeError(f"{folder}: {name} was altered (its sha256 differs from {MANIFEST}); download or export the folder again")


def resolve_pretrained(name_or_path: str | os.PathLike, revision: Optional[str] = None, token: Optional[str] = None) -> Path:
    """A local folder as is; ``user/repo`` (not an existing path) via ``huggingface_hub.snapshot_download``."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    text = str(name_or_path)
    if p.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"pretrained={text}: no such folder (give an exported folder or a Hub id user/repo)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, revision=revision, token=token))
    except Exception as e:
        raise RuntimeError(f"pretrained={text}: could not download it from the Hugging Face Hub "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the id, your "
                           "network and `huggingface-cli login` for private repos, or give a local folder") from e


def load_pretrained(name_or_path: str | os.PathLike, device: Optional[torch.device | str] = None,
                    revision: Optional[str] = None, token: Optional[str] = None) -> Pretrained:
    """Load an exported folder (or Hub repo): the model in eval mode, the diffusion and the sampler."""
    from hydra.utils import instantiate
    from safetensors.torch import load_model

    import ddlab.config  # noqa: F401  (resolvers, should a config still hold interpolations)

    folder = resolve_pretrained(name_or_path, revision, token)
    verify_folder(folder)
    config = json.loads((folder / CONFIG).read_text())
    model = instantiate(config["model"])
    try:
        load_model(model, str(folder / WEIGHTS), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{folder / WEIGHTS} does not fit the model config in {CONFIG} ({str(e).splitlines()[0]})") from e
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return Pretrained(model=model, diffusion=instantiate(config["scheduler"]), config=config.get("run_config") or config,
                      global_step=int(config.get("global_step", 0)), path=folder, ema=bool(config.get("ema", True)),
                      sampler=instantiate(config["sampler"]), metrics=config.get("metrics") or {})


def run_metrics(ckpt: str | os.PathLike) -> dict:
    """The run's ``metrics.json`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/metrics.json``), if any."""
    path = Path(ckpt).resolve().parent.parent / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, ema: bool = True, grid_n: int = 16, seed: int = 0,
                      device: Optional[str] = None) -> Path:
    """``ddlab.export``: a ddlab checkpoint -> an exported folder (EMA weights unless ``ema=False``)."""
    from ddlab.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, use_ema=ema, device=device)
    return export_model(loaded.model, loaded.config, out, global_step=loaded.global_step, ema=ema,
                        metrics=run_metrics(ckpt), grid_n=grid_n, seed=seed, source=str(ckpt))


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Upload ddlab model", verify: bool = True) -> str:
    """Upload an exported folder to the Hub repo ``repo_id`` (created if missing); returns its URL.
    ``verify`` checks a ddlab folder's manifest first (off for diffusers pipeline folders)."""
    from huggingface_hub import HfApi

    if not repo_id or str(repo_id).count("/") != 1:
        raise ValueError(f"hub_model_id must look like user/repo, got {repo_id!r}")
    folder = Path(folder)
    if verify:
        verify_folder(folder)
    api = HfApi(token=token)
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message)
    return str(url)


def load_pretrained_checkpoint(name_or_path: str | os.PathLike, use_ema: bool = True,
                               device: Optional[torch.device | str] = None) -> Pretrained:
    """:func:`load_pretrained` for the evaluation core (``pretrained=`` in place of ``ckpt=``): the same
    fields as :func:`ddlab.checkpoint.load_checkpoint`'s result. An export holds one set of weights, so
    asking for the other set (``ema=false`` of an EMA export, or the reverse) is refused."""
    p = load_pretrained(name_or_path, device=device)
    if bool(use_ema) != p.ema:
        have, want = ("EMA", "live") if p.ema else ("live", "EMA")
        raise ValueError(f"pretrained={name_or_path} holds the {have} weights only, but ema={str(bool(use_ema)).lower()} asks "
                         f"for the {want} weights; use ema={str(p.ema).lower()} or export with ema={str(not p.ema).lower()}")
    return p
