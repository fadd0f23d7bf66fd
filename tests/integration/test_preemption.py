"""Preemption: SIGTERM / SIGUSR1 -> checkpoint at the current step and exit 0; the identical command
with ckpt_path=auto and a fixed run_id continues in the same folder; SIGUSR1 under SLURM requeues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.integration.test_train import TINY


def start(log_dir: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ddlab.train", *TINY, "data.limit=512", "trainer.max_steps=100000", "trainer.limit_val_batches=0",
           "callbacks.sample_grid=null", "callbacks.checkpoint.every_n_steps=3", "logger=csv", "torch_threads=1",
           f"paths.log_dir={log_dir}", "run_id=job42", "ckpt_path=auto"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_after_checkpoint(proc: subprocess.Popen, last: Path, min_step: int, sig: int) -> tuple[int, str]:
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint at step >= {min_step} within 240 s")
        if last.is_file():
            try:
                if torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= min_step:
                    break
            except Exception:  # being replaced right now
                pass
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_the_same_command_continues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")  # a stand-in for SLURM's scontrol
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run_dir = tmp_path / "logs" / "train" / "runs" / "job42"
    last = run_dir / "checkpoints" / "last.ckpt"

    rc, out = signal_after_checkpoint(start(tmp_path / "logs", env), last, 3, signal.SIGTERM)
    assert rc == 0, out[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 3 and "ckpt_path=auto: no" in out  # the first start was fresh
    assert f"checkpoint at step {step} written" in out  # written at the step the signal arrived, not a scheduled one
    assert not calls.exists()  # SIGTERM outside SLURM: no requeue

    # the identical command: the same folder, resumed from that step; SIGUSR1 under "SLURM" requeues
    env_slurm = {**env, "SLURM_JOB_ID": "4242"}
    rc, out = signal_after_checkpoint(start(tmp_path / "logs", env_slurm), last, step + 3, signal.SIGUSR1)
    assert rc == 0, out[-3000:]
    assert f"ckpt_path=auto: resuming from {last}" in out
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] > step
    assert calls.read_text().split() == ["requeue", "4242"]
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == ["job42"]
