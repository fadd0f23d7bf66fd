"""`python -m ddlab.fid` on a checkpoint and on an npz; FID of real images against their own statistics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddlab.data import MNISTDataModule
from ddlab.fid import evaluate
from ddlab.metrics import Evaluator, dataset_images_uint8, load_stats
from ddlab.train import train
from tests.conftest import ROOT, compose
from tests.inception_weights import write_random_weights


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    p = tmp_path_factory.getbasetemp() / "inception_random.pth"
    if not p.is_file():
        write_random_weights(p, seed=0, calibration_images=(4, 32))
    return p


@pytest.mark.slow
def test_fid_against_own_statistics_is_zero_and_grows_with_perturbation(tmp_path, mnist_dir, inception_weights):
    cfg = {"_target_": "ddlab.data.MNISTDataModule", "image_size": 28, "channels": 1, "num_classes": 10, "resize": "pad"}
    dm = MNISTDataModule(data_dir=str(mnist_dir), image_size=28, val_limit=10, batch_size=10)
    ev = Evaluator(cfg, dm, cache_dir=tmp_path, weights_path=str(inception_weights), isc=False, progress=False)
    real = dataset_images_uint8(dm.reference_dataset())
    assert real.shape == (10, 28, 28, 1) and real.dtype == np.uint8
    same = ev.evaluate(real)
    ref = ev.reference()
    scale = np.trace(ref.sigma)
    assert scale > 0 and abs(same["fid"]) < 1e-5 * scale  # eigvals of a rank-9 product: round-off only
    rng = np.random.default_rng(0)
    fids = [same["fid"]]
    for sigma in (20, 80):
        noisy = np.clip(real.astype(np.float64) + rng.normal(0, sigma, real.shape), 0, 255).round().astype(np.uint8)
        fids.append(ev.evaluate(noisy)["fid"])
    assert fids[0] < 1e-3 * fids[1] and fids[1] < fids[2]
    assert same["reference"]["key"].startswith("mnist-val-28px-1c-n10-") and same["reference"]["cache"] == "miss"
    # the cache file written on the way holds the statistics used (key inside and in the name)
    st = load_stats(ref.path, expected_key=ref.key)
    np.testing.assert_allclose(st.mu, ref.mu)


@pytest.mark.slow
def test_fid_cli_on_checkpoint_then_on_its_npz(tmp_path, inception_weights, mnist_dir):
    run = tmp_path / "train"
    cfg = compose(["model.base_channels=8", "model.channel_mult=[1,2]", "data.image_size=28", "scheduler.num_timesteps=10",
                   "sampler.progress=false", "data.limit=16", "data.val_limit=8", "data.batch_size=8", "trainer.max_time=null",
                   "trainer.max_steps=2", "callbacks.progress_bar=null", "trainer.limit_val_batches=1",
                   "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.at_end=false"], output_dir=run)
    train(cfg)
    ckpt = next((run / "checkpoints").glob("last*.ckpt"))
    out, cache = tmp_path / "fid", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "ddlab.fid", f"ckpt={ckpt}", "n=6", "batch_size=4", "sampler.steps=2", "sampler.guidance_scale=1.5",
           f"fid.weights_path={inception_weights}", f"fid.cache_dir={cache}", "fid.kid_subsets=3", "fid.prc=true", "reference.limit=8",
           "bpd.n=2", "progress=false", "torch_threads=2", f"hydra.run.dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "fid=" in r.stdout
    rec = json.loads((out / "fid.json").read_text())
    assert rec["num_samples"] == 6 and rec["sampler"]["steps"] == 2 and rec["sampler"]["guidance_scale"] == 1.5
    assert rec["sampler"]["name"] == "ddim" and rec["ema"] is True  # the checkpoint's sampler, steps and guidance overridden
    assert np.isfinite(rec["fid"]) and rec["fid"] > 0
    assert {"kid_mean", "kid_std", "is_mean", "precision", "recall"} <= rec.keys() and rec["kid_subset_size"] == 6
    assert rec["reference"]["key"].startswith("mnist-val-28px-1c-n8-") and rec["reference"]["cache"] == "miss"
    assert rec["bpd_n"] == 2 and rec["bpd"] > rec["bpd_prior"] >= 0 and rec["bpd_conditional"] is True
    with np.load(out / "samples.npz") as z:  # OpenAI-evaluator layout
        assert z["arr_0"].shape == (6, 28, 28, 1) and z["arr_0"].dtype == np.uint8
        assert sorted(np.bincount(z["arr_1"], minlength=10).tolist()) == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]  # balanced classes

    # the same samples as an npz, in-process: same images and reference -> same FID, and the cache is hit
    cfg2 = compose([f"ckpt={ckpt}", f"samples={out / 'samples.npz'}", f"fid.weights_path={inception_weights}",
                    f"fid.cache_dir={cache}", "fid.kid_subsets=3", "fid.prc=true", "reference.limit=8", "progress=false",
                    f"out={tmp_path / 'again'}"], config_name="fid")
    rec2 = evaluate(cfg2)
    assert rec2["reference"]["cache"] == "hit" and rec2["num_samples"] == 6
    assert rec2["fid"] == pytest.approx(rec["fid"], rel=1e-6)
    assert json.loads((tmp_path / "again" / "fid.json").read_text())["fid"] == rec2["fid"]


    # `make fid` with the offline MNIST domain metric: same checkpoint, the Makefile's N / STEPS / GUIDANCE
    from ddlab.metrics.classifier import train_classifier

    cnn = train_classifier(mnist_dir, tmp_path / "cnn.pt", epochs=1, limit=500, test_limit=100, progress=False)["path"]
    out3 = tmp_path / "make_fid"
    args = (f"fid.feature_extractor=mnist_cnn fid.classifier_path={cnn} fid.cache_dir={cache} reference.limit=8 "
            f"batch_size=4 progress=false sampler=dpmpp_2m hydra.run.dir={out3}")
    r = subprocess.run(["make", "-s", "-o", str(ROOT / ".venv" / ".ddlab-installed"), f"PY={sys.executable}", "fid", f"CKPT={ckpt}",
                        "N=10", "STEPS=3", "GUIDANCE=2", f"ARGS={args}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    rec3 = json.loads((out3 / "fid.json").read_text())
    assert rec3["feature_extractor"] == "mnist_cnn" and rec3["num_samples"] == 10
    assert rec3["sampler"]["steps"] == 3 and rec3["sampler"]["guidance_scale"] == 2 and rec3["sampler"]["name"] == "dpmpp_2m"
    assert 0 <= rec3["class_accuracy"] <= 1 and rec3["reference"]["key"].split("-")[-2] == "mnist_cnn"
    assert "class_accuracy=" in r.stdout


def test_fid_cli_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="ckpt=.*samples="):
        evaluate(compose([f"out={tmp_path}"], config_name="fid"))
    with pytest.raises(ValueError, match="data=<name>"):
        evaluate(compose([f"samples={tmp_path}", f"out={tmp_path}"], config_name="fid"))
