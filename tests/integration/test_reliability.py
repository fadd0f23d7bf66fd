"""Reliability: exact resume, SIGKILL, non-finite loss, atomic checkpoints, bad input."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddlab.train import train
from tests.conftest import ROOT, compose
from tests.integration.test_train import TINY

QUIET = TINY + [
    "trainer.limit_val_batches=0",
    "callbacks.sample_grid=null",
    "callbacks.checkpoint.every_n_steps=4",
]


def weights(path):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return ck, {k: v for k, v in ck["state_dict"].items()}


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    train(compose(QUIET + ["trainer.max_epochs=4", "timestep_sampler=loss_aware"], output_dir=full))
    part = tmp_path / "part"
    train(compose(QUIET + ["trainer.max_epochs=2", "timestep_sampler=loss_aware"], output_dir=part))
    resumed = tmp_path / "resumed"
    train(compose(QUIET + ["trainer.max_epochs=4", "timestep_sampler=loss_aware", f"ckpt_path={part / 'checkpoints' / 'last.ckpt'}"], output_dir=resumed))
    a, wa = weights(full / "checkpoints" / "last.ckpt")
    b, wb = weights(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 16
    assert wa.keys() == wb.keys()
    for k in wa:  # live weights and EMA weights
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    # optimizer moments, LR scheduler and the loss-aware sampler's history too
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=0, atol=1e-9)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 16
    torch.testing.assert_close(a["timestep_sampler"]["loss_history"], b["timestep_sampler"]["loss_history"])


def _train_cmd(out: Path, *overrides):
    return [sys.executable, "-m", "ddlab.train", f"hydra.run.dir={out}", "torch_threads=1", *TINY, *overrides]


@pytest.mark.slow
def test_sigkill_then_resume_from_last(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _train_cmd(out, "trainer.max_steps=100000", "data.limit=512", "callbacks.checkpoint.every_n_steps=2", "callbacks.sample_grid=null", "trainer.limit_val_batches=0"),
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if last.is_file():
                ck = torch.load(last, map_location="cpu", weights_only=False)
                if ck["global_step"] >= 6:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("training never wrote a checkpoint at step >= 6")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ck = torch.load(last, map_location="cpu", weights_only=False)  # still readable after the kill
    step = ck["global_step"]
    assert step >= 6 and step % 2 == 0
    out2 = tmp_path / "resumed"
    train(compose(TINY + [f"ckpt_path={last}", f"trainer.max_steps={step + 2}", "data.limit=512", "callbacks.sample_grid=null", "trainer.limit_val_batches=0"], output_dir=out2))
    assert torch.load(out2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == step + 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from ddlab.diffusion import GaussianDiffusion

    real = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        terms = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 6:  # the 6th training step (global step 5) goes non-finite
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)
    cfg = compose(QUIET + ["trainer.max_steps=20", "callbacks.checkpoint.every_n_steps=2"], output_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="global step 5"):
        train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    ck = torch.load(last, map_location="cpu", weights_only=False)
    assert ck["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    from ddlab.training import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    real_save = torch.save

    def dies_midway(obj, f, *a, **k):
        # serialise part of the checkpoint, then "die"
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ck = io.load_checkpoint(path)
    assert ck["global_step"] == 1 and torch.equal(ck["state_dict"]["w"], torch.ones(3))

    # killed after the new file is written but before it is renamed into place
    def dies_before_rename(src, dst):
        raise KeyboardInterrupt("killed before rename")

    monkeypatch.setattr(os, "replace", dies_before_rename)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 3}, path)
    monkeypatch.undo()
    ck = io.load_checkpoint(path)
    assert ck["global_step"] == 1 and torch.equal(ck["state_dict"]["w"], torch.ones(3))


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match=r"last.ckpt is corrupt or truncated"):
        train(compose(TINY + [f"ckpt_path={bad}"], output_dir=tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match=r"does not exist \(ckpt_path=\.\.\.: give the path"):
        train(compose(TINY + [f"ckpt_path={tmp_path / 'nope.ckpt'}"], output_dir=tmp_path / "o"))


def test_checkpoint_from_another_model_config(tmp_path):
    run = tmp_path / "a"
    train(compose(QUIET + ["trainer.max_steps=2"], output_dir=run))
    with pytest.raises(ValueError, match=r"model.base_channels: checkpoint 8 vs now 16"):
        train(compose(QUIET + ["trainer.max_steps=4", "model.base_channels=16", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], output_dir=tmp_path / "b"))


@pytest.mark.parametrize(
    "override,match",
    [
        ("module.optimizer.lr=-1", "module.optimizer.lr must be positive"),
        ("data.batch_size=0", "data.batch_size must be a positive integer"),
        ("sampler.steps=0", "sampler.steps must be an integer"),
        ("sampler.eta=1.5", r"sampler.eta must lie in \[0, 1\]"),
        ("data.image_size=30 model.channel_mult=[1,2,2]", "image_size"),
        ("model.num_classes=5", "model.num_classes=5 but data.num_classes=10"),
        ("model.channel_mult=[1,2,2,2,2,2,2]", "channel_mult"),
        ("scheduler.prediction=epsilon", "scheduler.prediction: unknown value 'epsilon'"),
        ("scheduler.num_timesteps=0", "scheduler.num_timesteps must be a positive integer"),
        ("data.limit=0", "data.limit must be a positive integer"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing; give a positive number, or -1"),
        ("trainer.devices=0", r"trainer.devices=0 selects no device; use trainer.devices=1"),
        ("+model.chanels=64", r"unknown option\(s\) 'chanels'; valid options: image_size"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ],
)
def test_bad_input_fails_early_naming_the_key(override, match, tmp_path):
    cfg = compose(TINY + ["trainer.max_steps=1", *override.split()], output_dir=tmp_path)  # a missed check ends, not hangs
    t0 = time.perf_counter()
    with pytest.raises(Exception, match=match):
        train(cfg)
    assert time.perf_counter() - t0 < 20  # before any training compute


def test_typo_in_key_is_rejected():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="base_chanels"):
        compose(["model.base_chanels=8"])


def test_empty_data_dir_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose(TINY + [f"paths.data_dir={empty}", "data.download=false"], output_dir=tmp_path / "o")
    with pytest.raises(FileNotFoundError, match=f"MNIST not found in {empty}"):
        train(cfg)


def test_guidance_on_unconditional_model_is_clear():
    from ddlab.diffusion import GaussianDiffusion, Sampler
    from ddlab.models import UNet

    m = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,), num_classes=0)
    with pytest.raises(ValueError, match="trained without labels"):
        Sampler(steps=2, guidance_scale=3.0, progress=False).sample(m, GaussianDiffusion(num_timesteps=10), (1, 1, 8, 8), y=torch.tensor([1]))


def _val_mse(run: Path) -> list[float]:
    import csv

    with open(run / "csv" / "metrics.csv") as f:
        return [float(r["val/mse"]) for r in csv.DictReader(f) if r.get("val/mse")]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_gloo_matches_single_process_and_resumes(tmp_path):
    """2 processes x batch 16 (gloo) against 1 process x batch 32: the same global batch gives the same
    held-out loss curve (EMA weights, fixed noise) within tolerance; the DDP run resumes from last.ckpt;
    there is one output folder for the run, not one per rank."""
    common = [*TINY, "data.limit=256", "data.val_limit=64", "trainer.limit_val_batches=1.0", "trainer.max_epochs=3",
              "callbacks.sample_grid=null", "callbacks.checkpoint.every_n_steps=4", "logger=csv", "torch_threads=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]), "OMP_NUM_THREADS": "1"}  # this checkout

    def run(out, *extra):
        cmd = [sys.executable, "-m", "ddlab.train", *common, f"hydra.run.dir={out}", *extra]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-4000:]

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run(single, "data.batch_size=32")
    run(ddp, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16")
    a, b = _val_mse(single), _val_mse(ddp)
    assert len(a) == len(b) == 3
    assert b[-1] < b[0]  # it learns
    for x, y in zip(a, b):
        assert abs(x - y) / x < 0.2, (a, b)
    ck = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 3 * 256 // 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    assert len(list(tmp_path.rglob(".hydra"))) == 2  # one config folder per run, none per rank

    run(ddp, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16", "trainer.max_epochs=4",
        f"ckpt_path={ddp / 'checkpoints' / 'last.ckpt'}")
    ck = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 4 * 256 // 32


def _fail_saves_after(monkeypatch, n_ok: int, make_error):
    """Checkpoint writes after the first ``n_ok`` fail with ``make_error()`` (raised when the file is opened)."""
    import builtins

    import ddlab.io

    calls = {"n": 0}

    def failing_open(file, mode="r", *a, **k):
        if "w" in mode and str(file).endswith(".tmp") and ".ckpt" in str(file):
            calls["n"] += 1
            if calls["n"] > n_ok:
                raise make_error()
        return builtins.open(file, mode, *a, **k)

    monkeypatch.setattr(ddlab.io, "open", failing_open, raising=False)


@pytest.mark.parametrize("err,match", [
    (lambda: OSError(errno.ENOSPC, "No space left on device"), r"disk full writing step_000006.ckpt in .*checkpoints: it needs about [0-9.]+ MiB \([0-9.]+ MiB free\)"),
    (lambda: OSError(errno.EROFS, "Read-only file system"), r"cannot write step_000006.ckpt in .*checkpoints: the folder is read-only"),
], ids=["disk_full", "read_only"])
def test_failed_checkpoint_write_stops_the_run_and_keeps_the_last_good_one(tmp_path, monkeypatch, err, match):
    _fail_saves_after(monkeypatch, 4, err)  # step 2 and step 4 (step file + last.ckpt each) succeed
    cfg = compose(QUIET + ["trainer.max_steps=12", "callbacks.checkpoint.every_n_steps=2"], output_dir=tmp_path)
    with pytest.raises(OSError, match=match):
        train(cfg)
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 4  # the last good checkpoint, intact
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step_000002.ckpt", "step_000004.ckpt"]


def test_failed_mnist_download_leaves_no_folders(tmp_path, monkeypatch):
    import torchvision.datasets

    from ddlab.data import load_mnist

    def offline(root, *a, **k):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does before downloading
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    target = tmp_path / "new" / "mnist"
    with pytest.raises(FileNotFoundError, match="download failed: network unreachable"):
        load_mnist(target, "train", download=True)
    assert list(tmp_path.iterdir()) == []  # nothing created is left behind


def test_data_errors_are_shown_without_the_framework_stack(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "-m", "ddlab.train", *TINY, f"paths.data_dir={empty}", "data.download=false", f"hydra.run.dir={tmp_path / 'o'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("HYDRA_FULL_ERROR", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 1
    assert f"Error: MNIST not found in {empty}" in r.stderr and "HYDRA_FULL_ERROR=1" in r.stderr
    assert "Traceback" not in r.stderr and "lightning" not in r.stderr
    r = subprocess.run(cmd, cwd=ROOT, env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 1 and "Traceback" in r.stderr and "lightning" in r.stderr
