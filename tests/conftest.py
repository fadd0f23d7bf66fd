"""Shared test set-up: 2 torch threads, the offline MNIST files, Hydra composition helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
SHARED_MNIST = SHARED_DATA / "MNIST" / "raw"
CONFIG_DIR = ROOT / "configs"

torch.set_num_threads(2)
if "DDLAB_DATA_DIR" not in os.environ and SHARED_MNIST.is_dir():
    os.environ["DDLAB_DATA_DIR"] = str(SHARED_MNIST)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not SHARED_MNIST.is_dir():
        pytest.fail(f"the official MNIST files are expected in {SHARED_MNIST}")
    return SHARED_MNIST


def compose(overrides=(), config_name: str = "train", output_dir: str | os.PathLike | None = None):
    """Compose a real config with Hydra (as the CLI would) and fill in the run directory."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    import ddlab.config  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg
