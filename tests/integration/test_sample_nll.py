"""ddlab.sample and ddlab.nll on the checkpoint of a tiny model trained for a few steps on real MNIST."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddlab.nll import nll
from ddlab.sample import make_labels, sample
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
    return compose([f"ckpt={ckpt}", f"out={out}", "sampler.progress=false", "progress=false", *extra], config_name="sample")


def test_sample_writes_grid_and_npz(ckpt, tmp_path):
    res = sample(_sample_cfg(ckpt, tmp_path, "sampler=ddim", "sampler.steps=5", "sampler.eta=0", "n=7",
                             "batch_size=3", "guidance_scale=3", "labels=[7,2]"))
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
    common = ["sampler.steps=3", "n=4", "labels=[1]", "guidance_scale=1"]
    a = sample(_sample_cfg(ckpt, tmp_path / "a", *common))["images"]
    b = sample(_sample_cfg(ckpt, tmp_path / "b", *common))["images"]
    c = sample(_sample_cfg(ckpt, tmp_path / "c", *common, "ema=false"))["images"]
    np.testing.assert_array_equal(a, b)  # same seed, same images
    assert not np.array_equal(a, c)      # live weights differ from EMA after a few steps
    # batching does not change the images (noise is drawn per batch from one generator: compare batch 1 of 1)
    d = sample(_sample_cfg(ckpt, tmp_path / "d", *common, "batch_size=4"))["images"]
    np.testing.assert_array_equal(a, d)


def test_make_labels():
    g = torch.Generator().manual_seed(0)
    assert make_labels([3], 4, 10, g).tolist() == [3, 3, 3, 3]
    assert make_labels([1, 2, 3], 5, 10, g).tolist() == [1, 2, 3, 1, 2]
    assert make_labels(None, 5, 0, g) is None
    r = make_labels(None, 2000, 10, g)
    assert r.min() == 0 and r.max() == 9 and abs(r.float().mean().item() - 4.5) < 0.2
    with pytest.raises(ValueError, match="labels"):
        make_labels([10], 3, 10, g)
    with pytest.raises(ValueError, match="without labels"):
        make_labels([1], 3, 0, g)


def test_nll_reports_bits_per_dim_with_terms(ckpt, tmp_path):
    cfg = compose([f"ckpt={ckpt}", f"out={tmp_path}", "n=6", "batch_size=4", "progress=false"], config_name="nll")
    rec = nll(cfg)
    saved = json.loads((tmp_path / "nll.json").read_text())
    assert saved["n"] == 6 and saved["num_timesteps"] == 20 and saved["split"] == "val"
    assert saved["bits_per_dim"] == pytest.approx(saved["prior_bpd"] + saved["vb_sum_bpd"] + saved["decoder_bpd"], rel=1e-6)
    assert rec["bits_per_dim"] == saved["bits_per_dim"]
    # a barely trained model with fixed_small variance: a loose bound (hundreds of bits/dim), but finite
    assert 0 < saved["bits_per_dim"] and math.isfinite(saved["bits_per_dim"]) and math.isfinite(saved["bits_per_dim_stderr"])
    assert 0 <= saved["prior_bpd"] < 1e-2  # cosine schedule at T = 20 ends near N(0, I)
