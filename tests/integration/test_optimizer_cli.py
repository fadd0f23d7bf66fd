"""Swapping the optimizer from the command line (module.optimizer is a Hydra target)."""

import subprocess
import sys

import torch

from tests.conftest import ROOT
from tests.integration.test_train import TINY


def test_sgd_from_the_command_line_trains(tmp_path):
    out = tmp_path / "sgd"
    cmd = [sys.executable, "-m", "ddlab.train", f"hydra.run.dir={out}", "torch_threads=1", *TINY, "trainer.max_steps=2",
           "callbacks.checkpoint.every_n_steps=2", "trainer.limit_val_batches=0",
           "module.optimizer._target_=torch.optim.SGD", "~module.optimizer.betas", "~module.optimizer.eps",
           "+module.optimizer.momentum=0.9"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    group = ck["optimizer_states"][0]["param_groups"][0]
    assert ck["global_step"] == 2 and group["momentum"] == 0.9 and "betas" not in group
    # SGD with momentum keeps a momentum buffer per parameter (AdamW would keep exp_avg / exp_avg_sq)
    assert all(set(s) == {"momentum_buffer"} for s in ck["optimizer_states"][0]["state"].values())
