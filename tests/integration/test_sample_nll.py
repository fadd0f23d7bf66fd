"""ddlab.sample and ddlab.nll on the checkpoint of a tiny model trained for a few steps on real MNIST."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddlab.evaluation import make_labels
from ddlab.nll import nll
from ddlab.sample import sample
from ddlab.train import train
from tests.conftest import compose
from tests.integration.test_train import TINY


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(compose(TINY + ["trainer.max_epochs=1", "scheduler.num_timesteps=20"], output_dir=run))
    path = run / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def _sample_cfg(ckpt, out, *extra):
    return compose([f"ckpt={ckpt}", f"out={out}", "progress=false", *extra], config_name="sample")


def test_sample_writes_grid_and_npz(ckpt, tmp_path, capfd):
    capfd.readouterr()
    res = sample(_sample_cfg(ckpt, tmp_path, "sampler=ddim", "sampler.steps=5", "sampler.eta=0", "n=7",
                             "batch_size=3", "sampler.guidance_scale=3", "labels=[7,2]"))
    assert "sampling" not in capfd.readouterr().err  # progress=false: no bar at all, the sampler's own included
    with np.load(tmp_path / "samples.npz") as f:
        arr, lab = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (7, 32, 32, 1)
    assert lab.tolist() == [7, 2, 7, 2, 7, 2, 7] and np.issubdtype(lab.dtype, np.integer)
    assert res["guidance_scale"] == 3.0
    grid = Image.open(tmp_path / "grid.png")
    # 3 columns (ceil(sqrt(7))), 3 rows of 32 px tiles with 2 px padding
    assert grid.size == (3 * 34 + 2, 3 * 34 + 2)
    # the grid shows the npz images: tile (row 0, col 1) is image 1
    tile = np.asarray(grid.convert("L"))[2:34, 36:68]
    np.testing.assert_array_equal(tile, arr[1, :, :, 0])


def test_sample_ema_default_differs_from_live_and_is_deterministic(ckpt, tmp_path):
    common = ["sampler.steps=3", "n=4", "labels=[1]", "sampler.guidance_scale=1"]
    a = sample(_sample_cfg(ckpt, tmp_path / "a", *common))["images"]
    b = sample(_sample_cfg(ckpt, tmp_path / "b", *common))["images"]
    c = sample(_sample_cfg(ckpt, tmp_path / "c", *common, "ema=false"))["images"]
    np.testing.assert_array_equal(a, b)  # same seed, same images
    assert not np.array_equal(a, c)      # live weights differ from EMA after a few steps
    # the checkpoint's DDIM (eta 0) is deterministic and image i has its own starting noise: batching does not matter
    d = sample(_sample_cfg(ckpt, tmp_path / "d", *common, "batch_size=3"))["images"]
    np.testing.assert_array_equal(a, d)


def test_make_labels():
    assert make_labels([3], 4, 10).tolist() == [3, 3, 3, 3]
    assert make_labels([1, 2, 3], 5, 10).tolist() == [1, 2, 3, 1, 2]
    assert make_labels(None, 5, 0) is None
    r = make_labels(None, 2005, 10, seed=1)  # no labels: every class n // K or n // K + 1 times, shuffled by the seed
    assert sorted(np.bincount(r.numpy()).tolist()) == [200] * 5 + [201] * 5
    assert r[:10].tolist() != list(range(10)) and torch.equal(r, make_labels(None, 2005, 10, seed=1))
    assert not torch.equal(r, make_labels(None, 2005, 10, seed=2))
    with pytest.raises(ValueError, match="labels"):
        make_labels([10], 3, 10)
    with pytest.raises(ValueError, match="without labels"):
        make_labels([1], 3, 0)


def test_nll_reports_bits_per_dim_with_terms(ckpt, tmp_path):
    cfg = compose([f"ckpt={ckpt}", f"out={tmp_path}", "n=6", "batch_size=4", "progress=false"], config_name="nll")
    rec = nll(cfg)
    saved = json.loads((tmp_path / "nll.json").read_text())
    assert saved["bpd_n"] == 6 and saved["num_timesteps"] == 20 and saved["split"] == "val" and saved["bpd_clip_x0"] is True
    assert saved["bpd"] == pytest.approx(saved["bpd_prior"] + saved["bpd_vb"] + saved["bpd_decoder"], rel=1e-6)
    assert rec["bpd"] == saved["bpd"]
    assert 0 < saved["bpd"] and math.isfinite(saved["bpd"]) and math.isfinite(saved["bpd_stderr"])
    assert 0 <= saved["bpd_prior"] < 1e-2  # cosine schedule at T = 20 ends near N(0, I)
    # clipping x0 inside the bound (the default, as improved-diffusion evaluates) can only help a barely trained model
    unclipped = nll(compose([f"ckpt={ckpt}", f"out={tmp_path / 'u'}", "n=6", "batch_size=4", "progress=false", "clip_x0=false"],
                            config_name="nll"))
    assert unclipped["bpd_clip_x0"] is False and unclipped["bpd"] > saved["bpd"]
