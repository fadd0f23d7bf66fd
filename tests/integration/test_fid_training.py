"""FID during training: single process and 2-process gloo DDP on CPU, with random Inception weights."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.inception_weights import write_random_weights
from ddlab.train import train
from tests.conftest import ROOT, compose

TINY = [
    "model.base_channels=8",
    "model.channel_mult=[1,2]",
    "data.image_size=28",
    "scheduler.num_timesteps=20",
    "sampler.steps=3",
    "sampler.progress=false",
    "data.limit=32",
    "data.val_limit=12",
    "data.batch_size=16",
    "trainer.max_time=null",
    "callbacks.progress_bar=null",
    "trainer.limit_val_batches=1",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.sample_grid.at_end=false",
    "module.lr_scheduler.warmup_steps=2",
    "callbacks.fid.every_n_epochs=1",
    "callbacks.fid.num_samples=10",
    "callbacks.fid.steps=2",
    "callbacks.fid.batch_size=8",
    "callbacks.fid.feature_batch_size=16",
]


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    p = tmp_path_factory.getbasetemp() / "inception_random.pth"
    if not p.is_file():
        write_random_weights(p, seed=0, calibration_images=(4, 32))
    return p


def _metrics_rows(run: Path) -> list:
    with open(run / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("val/fid")]


@pytest.mark.slow
def test_fid_in_training_single_process(tmp_path, inception_weights):
    run, cache = tmp_path / "run", tmp_path / "cache"
    cfg = compose(TINY + ["trainer.max_epochs=2", f"callbacks.fid.weights_path={inception_weights}", f"callbacks.fid.cache_dir={cache}",
                          "callbacks=best_fid"], output_dir=run)
    train(cfg)
    rows = _metrics_rows(run)
    fids = [float(r["val/fid"]) for r in rows]
    best = [float(r["val/fid_best"]) for r in rows]
    assert len(fids) == 2 and all(math.isfinite(v) and v > 0 for v in fids)
    assert best == [fids[0], min(fids)]
    # reference statistics: 12 val images, 28 px, 1 channel; cached once under their key
    stats = list(cache.glob("*.npz"))
    assert len(stats) == 1 and stats[0].name.startswith("mnist-val-28px-1c-n12-")
    assert sorted(p.name for p in (run / "fid").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
    # ModelCheckpoint(monitor=val/fid, mode=min) kept the best epoch's checkpoint
    ck = list((run / "checkpoints").glob("best_fid_step_*.ckpt"))
    assert len(ck) == 1
    step_best = 2 * (1 + fids.index(min(fids)))  # 32 images / batch 16 = 2 steps per epoch
    assert ck[0].name == f"best_fid_step_{step_best:06d}.ckpt"
    saved = torch.load(ck[0], map_location="cpu", weights_only=False)
    assert saved["callbacks"]  # FIDCallback state (best) travels in checkpoints
    assert any(v.get("best") == pytest.approx(min(fids)) for v in saved["callbacks"].values() if isinstance(v, dict))


@pytest.mark.slow
@pytest.mark.ddp
def test_fid_in_training_ddp_gloo(tmp_path, inception_weights):
    run, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ddlab.train", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_epochs=1", "data.limit=64", f"callbacks.fid.weights_path={inception_weights}", f"callbacks.fid.cache_dir={cache}",
           "callbacks.fid.num_samples=9", "logger=csv", f"hydra.run.dir={run}", "torch_threads=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = _metrics_rows(run)
    assert len(rows) == 1 and math.isfinite(float(rows[0]["val/fid"]))
    assert float(rows[0]["val/fid_best"]) == float(rows[0]["val/fid"])
    assert len(list(cache.glob("mnist-val-28px-1c-n12-*.npz"))) == 1
    assert (run / "fid" / "epoch_0000.png").is_file()


@pytest.mark.slow
def test_domain_metric_kid_and_bits_per_dim_reach_wandb(tmp_path, mnist_dir):
    """In-training evaluation with the MNIST classifier (KID on, class accuracy) and bits/dim, logged to an
    offline W&B run: the values in W&B's own run file equal those in the CSV log."""
    from ddlab.metrics.classifier import train_classifier
    from tests.integration.test_wandb import read_run

    cnn = train_classifier(mnist_dir, tmp_path / "cnn.pt", epochs=1, limit=1000, test_limit=200, progress=False)["path"]
    run = tmp_path / "run"
    cfg = compose(TINY + ["trainer.max_epochs=2", "callbacks.fid.feature_extractor=mnist_cnn", f"callbacks.fid.classifier_path={cnn}",
                          f"callbacks.fid.cache_dir={tmp_path / 'cache'}", "callbacks.fid.kid=true", "callbacks.bpd.every_n_epochs=2",
                          "callbacks.bpd.num_images=4", "logger=[csv,wandb]", "name=fid_wb"], output_dir=run)
    train(cfg)
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    fid_rows = [r for r in rows if r.get("val/fid")]
    assert len(fid_rows) == 2
    for r in fid_rows:
        assert math.isfinite(float(r["val/fid"])) and math.isfinite(float(r["val/kid_mean"]))
        assert 0 <= float(r["val/class_accuracy"]) <= 1 and 0 <= float(r["val/class_entropy"]) <= math.log(10) + 1e-9
    bpd = [r for r in rows if r.get("val/bpd")]
    assert len(bpd) == 1  # every 2nd epoch
    b = {k: float(bpd[0][f"val/bpd{k}"]) for k in ("", "_prior", "_decoder", "_vb")}
    assert b[""] > 0 and b[""] == pytest.approx(b["_prior"] + b["_decoder"] + b["_vb"], rel=1e-6)
    stats = list((tmp_path / "cache").glob("*.npz"))
    assert len(stats) == 1 and "mnist_cnn-" in stats[0].name

    wb = read_run(run)
    hist = [h for h in wb["history"] if "val/fid" in h]
    assert [h["val/fid"] for h in hist] == pytest.approx([float(r["val/fid"]) for r in fid_rows])
    assert any("val/fid_best" in h for h in wb["history"]) and any("val/class_accuracy" in h for h in wb["history"])
    assert [h["val/bpd"] for h in wb["history"] if "val/bpd" in h] == pytest.approx([b[""]])
