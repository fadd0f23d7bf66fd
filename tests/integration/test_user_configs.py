"""A user's own model, data set and config folder outside ddlab: selected through hydra.searchpath or
DDLAB_CONFIG_PATH, trained with `python -m ddlab.train`, sampled from the checkpoint with `ddlab.sample`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose

MYPKG = '''
import torch
from torch import nn

from ddlab.data import ImageDataModule, TensorImageDataset


class MyNet(nn.Module):
    """A two-convolution denoiser with a learned time embedding."""

    def __init__(self, image_size, in_channels, out_channels, num_classes=0, width=16, max_timesteps=1000):
        super().__init__()
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.time = nn.Embedding(max_timesteps, width)
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x, t, y=None):
        return self.out(torch.relu(self.inp(x) + self.time(t)[:, :, None, None]))


class Stripes(ImageDataModule):
    """Horizontal stripes at random phases."""

    def __init__(self, n=32, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def build_split(self, split):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        phase = torch.randint(0, 2, (self.n, 1, 1, 1), generator=g)
        rows = torch.arange(self.image_size).view(1, 1, -1, 1)
        x = (((rows + phase) % 2) * 2 - 1).float().expand(self.n, self.channels, self.image_size, self.image_size)
        return TensorImageDataset(*self.apply_limit(x.contiguous(), torch.zeros(self.n, dtype=torch.long)))
'''
CONFIGS = {
    "model/mynet.yaml": """
        _target_: mypkg.MyNet
        image_size: ${data.image_size}
        in_channels: ${data.channels}
        out_channels: ${ddlab.out_channels:${data.channels},${scheduler.variance}}
        num_classes: ${data.num_classes}
        width: 16
    """,
    "data/stripes.yaml": """
        _target_: mypkg.Stripes
        image_size: 8
        channels: 1
        num_classes: 0
        batch_size: 8
        n: 32
    """,
}
TINY = ["model=mynet", "data=stripes", "scheduler.num_timesteps=50", "sampler.steps=2", "sampler.progress=false",
        "trainer.max_time=null", "trainer.max_steps=3", "trainer.limit_val_batches=1", "callbacks.progress_bar=null",
        "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.at_end=false", "logger=csv", "torch_threads=2"]


@pytest.fixture
def user_project(tmp_path) -> Path:
    proj = tmp_path / "project"
    (proj / "mypkg").mkdir(parents=True)
    (proj / "mypkg" / "__init__.py").write_text(MYPKG)
    for name, text in CONFIGS.items():
        (proj / "conf" / name).parent.mkdir(parents=True, exist_ok=True)
        (proj / "conf" / name).write_text(textwrap.dedent(text).lstrip())
    return proj


def test_env_var_and_searchpath_add_the_user_groups(user_project, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(user_project))
    monkeypatch.delenv("DDLAB_CONFIG_PATH", raising=False)
    conf = user_project / "conf"
    cfg = compose(TINY[:2] + [f"hydra.searchpath=[file://{conf}]"])
    assert cfg.model._target_ == "mypkg.MyNet" and cfg.data._target_ == "mypkg.Stripes" and cfg.model.image_size == 8

    other = tmp_path / "more"  # a second folder after os.pathsep; the first one's files win
    (other / "data").mkdir(parents=True)
    (other / "data" / "stripes.yaml").write_text("_target_: elsewhere.Stripes\nimage_size: 4\nchannels: 1\nnum_classes: 0\n")
    (other / "sampler").mkdir()
    (other / "sampler" / "mine.yaml").write_text("_target_: ddlab.diffusion.Sampler\nkind: ddim\nsteps: 3\n")
    monkeypatch.setenv("DDLAB_CONFIG_PATH", f"{conf}{os.pathsep}{other}")
    cfg = compose(TINY[:2] + ["sampler=mine"])
    assert cfg.model._target_ == "mypkg.MyNet" and cfg.data._target_ == "mypkg.Stripes" and cfg.sampler.steps == 3

    from ddlab.config import user_config_dirs

    with pytest.raises(FileNotFoundError, match="DDLAB_CONFIG_PATH: .*nowhere.* is not a folder"):
        user_config_dirs(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_user_model_and_data_train_then_sample_from_the_command_line(user_project):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DDLAB_LOG_DIR": str(user_project / "logs")}
    env.pop("DDLAB_CONFIG_PATH", None)

    def run(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=user_project, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-4000:]

    run("ddlab.train", *TINY, "hydra.searchpath=[file://conf]", "hydra.run.dir=run")
    ckpt = user_project / "run" / "checkpoints" / "last.ckpt"
    # the checkpoint carries its config: sampling needs mypkg importable, not the config folder
    run("ddlab.sample", f"ckpt={ckpt}", "n=4", "batch_size=4", "progress=false", "hydra.run.dir=samples")
    import numpy as np

    with np.load(user_project / "samples" / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 8, 8, 1)
