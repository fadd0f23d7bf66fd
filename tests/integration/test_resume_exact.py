"""Exact resume from a mid-epoch checkpoint of a SIGKILLed run: single process (workers, gradient
accumulation, random flips) and 2-process gloo DDP. The reference is the same run uninterrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SHARED_DATA
from tests.integration.test_train import TINY

# 7 batches of 16 per epoch; checkpoints every 3 optimizer steps fall inside epochs
BASE = [*TINY, "data.limit=112", "data.batch_size=16", "trainer.limit_val_batches=0", "callbacks.sample_grid=null",
        "callbacks.checkpoint.every_n_steps=3", "callbacks.checkpoint.keep=-1", "logger=csv", "torch_threads=1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ddlab.train", f"hydra.run.dir={out}", *BASE, *overrides]


def run(out: Path, *overrides: str) -> None:
    r = subprocess.run(cmd(out, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]


def run_and_sigkill(out: Path, wait_for: str, *overrides: str) -> Path:
    """Start a long run, SIGKILL its process group once ``checkpoints/<wait_for>`` exists."""
    proc = subprocess.Popen(cmd(out, "trainer.max_steps=100000", *overrides), cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoints" / wait_for
    deadline = time.time() + 300
    try:
        while not target.is_file():
            if proc.poll() is not None:
                pytest.fail(f"training ended before {wait_for} was written: {proc.stderr.read()[-3000:]!r}")
            if time.time() > deadline:
                pytest.fail(f"no {wait_for} within 300 s")
            time.sleep(0.2)
        time.sleep(0.5)  # let it run on a little past the checkpoint
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the DDP launcher and its worker rank
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return target


def assert_same_state(a_path: Path, b_path: Path) -> None:
    a = torch.load(a_path, map_location="cpu", weights_only=False)
    b = torch.load(b_path, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:  # live and EMA weights
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for m in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[i][m], sb[i][m], rtol=0, atol=1e-6, msg=f"{i}.{m}")
    loader = a["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader == b["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]


def mid_epoch(ckpt: Path, batches_per_epoch: int) -> int:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert 0 < state["batches"] < batches_per_epoch, state  # the checkpoint lies inside an epoch
    return state["batches"]


@pytest.mark.slow
def test_sigkill_mid_epoch_resume_equals_uninterrupted_workers_accumulation_flips(tmp_path):
    """Butterflies (random flips) with 2 workers and 2 accumulated batches per step: 7 batches give
    4 optimizer steps per epoch; step 6 comes after batch 4 of 7 of epoch 1."""
    data = ["data=butterflies", f"data.path={SHARED_DATA / 'butterflies_leeds'}", "data.image_size=16", "data.num_workers=2",
            "data.persistent_workers=true", "data.pin_memory=false", "data.hflip=true", "trainer.accumulate_grad_batches=2"]
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    run(full, *data, "trainer.max_steps=9")
    ckpt = run_and_sigkill(killed, "step_000006.ckpt", *data)
    assert mid_epoch(ckpt, 7) == 4
    run(resumed, *data, "trainer.max_steps=9", f"ckpt_path={ckpt}")
    assert_same_state(full / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.ddp
def test_sigkill_mid_epoch_resume_equals_uninterrupted_ddp(tmp_path):
    """2 gloo processes x 16 MNIST images: 56 per rank = 3 batches (steps) per epoch; with a checkpoint
    every 2 steps, step 4 is batch 1 of 3 of epoch 1."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "callbacks.checkpoint.every_n_steps=2"]
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    run(full, *ddp, "trainer.max_steps=7")
    ckpt = run_and_sigkill(killed, "step_000004.ckpt", *ddp)
    assert mid_epoch(ckpt, 3) == 1
    run(resumed, *ddp, "trainer.max_steps=7", f"ckpt_path={ckpt}")
    assert_same_state(full / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")
