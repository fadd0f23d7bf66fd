"""The wheel carries the configs: build it, install it into a bare folder and train, sample and score
from an empty working directory with neither the source tree nor the repository's configs/ in sight."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.inception_weights import write_random_weights
from tests.conftest import ROOT

TINY = ["model.base_channels=8", "model.channel_mult=[1,2]", "data.image_size=28", "scheduler.num_timesteps=10",
        "data.limit=16", "data.val_limit=8", "data.batch_size=8", "data.num_workers=0", "trainer.max_time=null",
        "trainer.max_steps=2", "trainer.limit_val_batches=1", "callbacks.progress_bar=null",
        "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.at_end=false", "torch_threads=2"]


def build_wheel(dest: Path) -> Path:
    """``pip wheel`` on a copy of the project files (the checkout gets no build/ or egg-info folders)."""
    src = dest / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest / "dist"), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return next((dest / "dist").glob("ddlab-*.whl"))


@pytest.mark.slow
def test_installed_wheel_trains_samples_and_scores_from_an_empty_folder(tmp_path, mnist_dir):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ddlab/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)[:5]  # every config group ships

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DDLAB_CONFIG_PATH")}
    env.update(PYTHONPATH=str(site), DDLAB_DATA_DIR=str(mnist_dir), DDLAB_LOG_DIR=str(work / "logs"))

    def run(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-4000:]
        return r

    where = run("-c", "import ddlab, ddlab.config as c; print(ddlab.__file__); print(c.CONFIG_DIR)").stdout.split()
    assert Path(where[0]).is_relative_to(site) and Path(where[1]) == site / "ddlab" / "configs"

    run("-m", "ddlab.train", *TINY, f"hydra.run.dir={work / 'run'}")
    ckpt = next((work / "run" / "checkpoints").glob("last*.ckpt"))
    run("-m", "ddlab.sample", f"ckpt={ckpt}", "n=4", "batch_size=4", "sampler.steps=2", "progress=false", "torch_threads=2",
        f"hydra.run.dir={work / 'samples'}")
    assert (work / "samples" / "grid.png").is_file() and (work / "samples" / "samples.npz").is_file()

    weights = work / "inception_random.pth"
    write_random_weights(weights, seed=0, calibration_images=(4, 32))  # offline stand-in for the Inception download
    run("-m", "ddlab.fid", f"ckpt={ckpt}", "n=4", "batch_size=4", "sampler.steps=2", f"fid.weights_path={weights}",
        "fid.kid=false", "fid.isc=false", "reference.limit=8", "bpd.n=0", "progress=false", "torch_threads=2",
        f"hydra.run.dir={work / 'fid'}")
    rec = json.loads((work / "fid" / "fid.json").read_text())
    assert rec["num_samples"] == 4 and rec["fid"] > 0
