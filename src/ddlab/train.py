"""Training entry point: ``python -m ddlab.train [overrides]`` (Hydra).

Composes ``configs/train.yaml``; every object is built with ``hydra.utils.instantiate``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ddlab import config as _config  # noqa: F401  (registers resolvers)
from ddlab import runtime, sweep
from ddlab.io import atomic_write_text
from ddlab.models.contract import check_model_contract
from ddlab.training import wandb_utils

log = logging.getLogger("ddlab.train")


def instantiate_dict(node: Optional[DictConfig]) -> list:
    """Instantiate every entry with a ``_target_`` in a config dict (callbacks, loggers)."""
    from hydra.utils import instantiate

    if not node:
        return []
    return [instantiate(v) for v in node.values() if v is not None and "_target_" in v]


def validate_config(cfg: DictConfig) -> None:
    """Cheap consistency checks, before any data is read or any compute starts."""
    for key in ("data", "model", "scheduler", "sampler", "trainer", "module"):
        if key not in cfg or cfg[key] is None:
            raise ValueError(f"config has no `{key}` section; choose one with {key}=<option>")
    m, d = cfg.model, cfg.data
    if "num_classes" in m and int(m.num_classes) != int(d.num_classes):
        raise ValueError(
            f"model.num_classes={m.num_classes} but data.num_classes={d.num_classes}: set model.num_classes=${{data.num_classes}} "
            "(the default) or change one of them"
        )
    if "image_size" in m and int(m.image_size) != int(d.image_size):
        raise ValueError(f"model.image_size={m.image_size} but data.image_size={d.image_size}; they must match")
    if "in_channels" in m and int(m.in_channels) != int(d.channels):
        raise ValueError(f"model.in_channels={m.in_channels} but data.channels={d.channels}; they must match")
    t = cfg.trainer
    if t.get("max_epochs") == 0 or t.get("max_steps") == 0:
        key = "max_epochs" if t.get("max_epochs") == 0 else "max_steps"
        raise ValueError(f"trainer.{key}=0 trains nothing; give a positive number, or -1 for no limit "
                         "(then training stops at trainer.max_steps / max_epochs / max_time)")
    if str(t.get("devices")) in ("0", "[]"):
        raise ValueError("trainer.devices=0 selects no device; use trainer.devices=1 (or N for N devices, a list of ids "
                         "like [0,2], or auto), and trainer.accelerator=cpu to train on the CPU")


def usable_callbacks(callbacks: list, trainer_cfg, loggers: list) -> list:
    """Drop the configured callbacks that the rest of the run switched off: the progress bar when
    ``trainer.enable_progress_bar=false`` (Lightning refuses both at once) and the LR monitor when
    there is no logger (``logger=none``; Lightning refuses it without one)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar

    keep_bar = bool(trainer_cfg.get("enable_progress_bar", True))
    return [c for c in callbacks if not ((isinstance(c, ProgressBar) and not keep_bar)
                                         or (isinstance(c, LearningRateMonitor) and not loggers))]


# model keys that change only speed or memory, not the weights' shapes or meaning
_RUNTIME_MODEL_KEYS = {"gradient_checkpointing", "channels_last", "compile", "compile_mode", "dropout"}


def check_resume_checkpoint(path: str, resolved: dict) -> None:
    """Fail before any compute if ``ckpt_path`` is missing, unreadable, or was trained with another
    model or diffusion config than the one composed now."""
    from ddlab.checkpoint import read_checkpoint, run_config

    ck = read_checkpoint(path, key="ckpt_path")
    old = run_config(ck, path)
    for section, ignore in (("model", _RUNTIME_MODEL_KEYS), ("scheduler", {"loss", "vlb_weight", "min_snr_gamma"})):
        a, b = old.get(section, {}), resolved.get(section, {})
        diff = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))
        if diff:
            detail = ", ".join(f"{section}.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in diff)
            raise ValueError(
                f"ckpt_path={path} was trained with another {section} config ({detail}); resume with the same "
                f"{section} options (see the run's .hydra/config.yaml) or start a new run without ckpt_path"
            )


def resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> Optional[str]:
    """``ckpt_path``: a file, ``null`` (start fresh) or ``auto``: this run folder's ``last.ckpt`` when it
    exists (a requeued or rerun job continues), else start fresh."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None or str(ckpt_path) != "auto":
        return None if ckpt_path is None else str(ckpt_path)
    node = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    last = Path(node.get("dirpath") or output_dir / "checkpoints") / "last.ckpt"
    if last.is_file():
        log.info("ckpt_path=auto: resuming from %s", last)
        return str(last)
    log.info("ckpt_path=auto: no %s yet, starting fresh", last)
    return None


def fixed_wandb_id(cfg: DictConfig) -> Optional[str]:
    """A W&B run id derived from ``name`` and a ``run_id`` given on the command line (e.g. the SLURM job
    id), so a requeued job preempted before its first checkpoint still continues the same W&B run."""
    import re

    if not any(o.split("=", 1)[0].lstrip("+~") == "run_id" for o in sweep.task_overrides()):
        return None
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{cfg.get('name', 'run')}-{cfg.run_id}")[:64]


def make_preemption(cfg: DictConfig, output_dir: Path):
    """The :class:`~ddlab.training.preemption.Preemption` callback of ``cfg.preemption`` (``null``: off)."""
    from ddlab.training.preemption import Preemption

    node = cfg.get("preemption")
    if not node:
        return None
    unknown = set(node) - {"signals", "requeue"}
    if unknown:
        raise ValueError(f"preemption: unknown option(s) {sorted(unknown)}; valid: signals, requeue")
    return Preemption(dirpath=str(output_dir / "checkpoints"), signals=list(node.get("signals") or []), requeue=bool(node.get("requeue", True)))


def write_metrics(trainer, datamodule, n_params: dict, output_dir: Path) -> dict:
    """The run's final scalar metrics (also ``data/skipped_files``: undecodable image files left out
    under ``data.on_bad_file=skip``), logged and written to ``metrics.json`` by rank 0."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics.update({"global_step": trainer.global_step, "epoch": trainer.current_epoch, **n_params})
    skipped = len(getattr(datamodule, "skipped_files", None) or [])
    metrics["data/skipped_files"] = skipped
    for lg in trainer.loggers:
        lg.log_metrics({"data/skipped_files": skipped}, step=trainer.global_step)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _make_trainer(cfg: DictConfig, output_dir: Path, ckpt_path):
    """The callbacks (with the preemption handler), the loggers and the Trainer, in the order ``train`` needs."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from ddlab.training import AtomicCheckpointIO

    callbacks = instantiate_dict(cfg.get("callbacks"))
    preemption = make_preemption(cfg, output_dir)
    callbacks += [preemption] if preemption else []
    # resume continues the W&B run stored in the checkpoint; a fixed run_id gives a fixed W&B id
    wandb_utils.set_resume_id(cfg.get("logger"), ckpt_path, fallback_id=fixed_wandb_id(cfg))
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks += wandb_utils.callbacks_for(loggers)
    # Checkpoints come from ddlab's StepCheckpoint (and Lightning's ModelCheckpoint when configured);
    # with neither, Lightning must not add its default ModelCheckpoint.
    from lightning.pytorch.callbacks import Checkpoint

    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=usable_callbacks(callbacks, cfg.trainer, loggers),
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
    )
    return trainer, preemption, loggers


def train(cfg: DictConfig) -> Optional[float]:
    """Build everything from ``cfg`` and fit. Returns the value of ``cfg.optimized_metric``."""
    import lightning.pytorch as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from ddlab.training import count_parameters

    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    validate_config(cfg)
    if cfg.get("seed") is not None:  # seed 0 is a seed
        pl.seed_everything(int(cfg.seed), workers=True)

    output_dir = Path(cfg.paths.output_dir) if HydraConfig.initialized() else Path(cfg.trainer.default_root_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    ckpt_path = resolve_ckpt_path(cfg, output_dir)
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, resolved)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    check_model_contract(model, int(cfg.data.image_size), int(cfg.data.channels), _config._out_channels(cfg.data.channels, cfg.scheduler.get("variance")))
    diffusion = instantiate(cfg.scheduler)
    sampler = instantiate(cfg.sampler)
    module = instantiate(cfg.module, _partial_=True)(model=model, diffusion=diffusion, sampler=sampler, run_config=resolved)
    trainer, preemption, loggers = _make_trainer(cfg, output_dir, ckpt_path)
    runtime.apply(**(cfg.get("runtime") or {}), device=trainer.strategy.root_device)  # after the Trainer (it sets cudnn.benchmark)

    n_params = count_parameters(model)
    log.info("model: %s parameters; diffusion: %s", f"{n_params['params/total']:,}", diffusion)
    for lg in trainer.loggers:
        lg.log_hyperparams({**resolved, **n_params, **sweep.run_metadata()})

    exit_code = 1
    try:  # W&B runs are closed (marked failed on an error) so the next job of a sweep starts clean
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

        metrics = write_metrics(trainer, datamodule, n_params, output_dir)
        exit_code = 0
        if preemption is not None and preemption.stopped_at is not None:
            log.warning("stopped by signal %s at step %d: rerun the same command with ckpt_path=auto (and the same run_id) "
                        "to continue from %s", preemption.received, preemption.stopped_at, output_dir / "checkpoints" / "last.ckpt")
            preemption.maybe_requeue(trainer.is_global_zero)
    finally:
        wandb_utils.finish(loggers, exit_code=exit_code)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


# errors about the user's input (missing or corrupt data, bad values, unwritable folders) raised by ddlab
# code: shown as their message alone, without Lightning's frames, unless HYDRA_FULL_ERROR=1
_INPUT_ERRORS = (ValueError, FileNotFoundError, OSError, ImportError)


def is_input_error(e: BaseException) -> bool:
    from ddlab.training.module import NonFiniteLossError

    if isinstance(e, NonFiniteLossError):  # its message is the complete advice for this run
        return True
    if not isinstance(e, _INPUT_ERRORS):
        return False
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__))
    return last is not None and os.path.abspath(last).startswith(here + os.sep)


@hydra.main(version_base="1.3", config_path=_config.CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> Any:
    try:
        return sweep.guarded(train, cfg)  # on_error: raise | inf | nan
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not is_input_error(e):
            raise
        print(f"Error: {e}\n(set HYDRA_FULL_ERROR=1 for the full stack trace)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
