"""The evaluation core shared by ddlab.sample, ddlab.fid, ddlab.nll and the training callbacks: one
checkpoint, one seed, the same numbers and images whichever command computes them."""

import json

import numpy as np
import pytest
import torch

from ddlab import evaluation as ev
from ddlab.fid import evaluate
from ddlab.nll import nll
from ddlab.sample import sample
from ddlab.train import train
from tests.conftest import compose
from tests.integration.test_train import TINY

# the run trains with a sampler and guidance that differ from every command default
RUN = TINY + ["trainer.max_epochs=1", "scheduler.num_timesteps=20", "sampler=dpmpp_2m", "sampler.steps=3",
              "sampler.guidance_scale=1.5", "sampler.progress=false", "callbacks.bpd.every_n_epochs=1",
              "callbacks.bpd.num_images=4", "callbacks.bpd.batch_size=4", "logger=csv"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    train(compose(RUN, output_dir=out))
    return out


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from tests.inception_weights import write_random_weights

    p = tmp_path_factory.getbasetemp() / "inception_random.pth"
    if not p.is_file():
        write_random_weights(p, seed=0, calibration_images=(4, 32))
    return p


def _sample(ckpt, out, *extra):
    return sample(compose([f"ckpt={ckpt}", f"out={out}", "progress=false", *extra], config_name="sample"))


def test_sample_defaults_to_the_checkpoints_sampler_and_guidance(run, tmp_path):
    ckpt = run / "checkpoints" / "last.ckpt"
    res = _sample(ckpt, tmp_path / "a", "n=4", "batch_size=4")
    assert res["sampler"]["name"] == "dpmpp_2m" and res["sampler"]["steps"] == 3 and res["guidance_scale"] == 1.5
    # the same images as naming that sampler explicitly; another guidance gives others
    same = _sample(ckpt, tmp_path / "b", "n=4", "batch_size=4", "sampler=dpmpp_2m", "sampler.steps=3", "sampler.guidance_scale=1.5")
    other = _sample(ckpt, tmp_path / "c", "n=4", "batch_size=4", "sampler.guidance_scale=1.0")
    np.testing.assert_array_equal(res["images"], same["images"])
    assert other["guidance_scale"] == 1.0 and not np.array_equal(res["images"], other["images"])
    # a deterministic sampler draws image i from its own noise: the batch size does not change the images
    np.testing.assert_array_equal(res["images"], _sample(ckpt, tmp_path / "d", "n=4", "batch_size=3")["images"])
    # a guidance interval covering every noise level is plain guidance; one covering none is no guidance
    # (and the record's NFE, counted before sampling, says how many forwards were guided)
    every = _sample(ckpt, tmp_path / "e", "n=4", "batch_size=4", "+sampler.guidance_interval=[0.0,1.0e30]")
    never = _sample(ckpt, tmp_path / "f", "n=4", "batch_size=4", "+sampler.guidance_interval=[1.0e29,1.0e30]")
    np.testing.assert_array_equal(every["images"], res["images"])
    np.testing.assert_array_equal(never["images"], other["images"])
    assert (every["sampler"]["nfe"], never["sampler"]["nfe"], res["sampler"]["nfe"]) == (6, 3, 6)


def test_sampler_config_merges_overrides_and_replaces_on_another_target():
    ddim, heun = "ddlab.diffusion.samplers.ddim", "ddlab.diffusion.samplers.heun"
    stored = {"_target_": ddim, "steps": 10, "eta": 0.5, "guidance_scale": 1.25}
    assert ev.sampler_config(stored, {"steps": 3, "guidance_scale": None}) == {**stored, "steps": 3}
    assert ev.sampler_config(stored, {"_target_": ddim, "eta": 0.0})["guidance_scale"] == 1.25
    assert ev.sampler_config(stored, {"_target_": heun, "steps": 4}) == {"_target_": heun, "steps": 4}
    # a checkpoint written before the per-sampler builders stores `kind` (and an unused eta)
    legacy = {"_target_": "ddlab.diffusion.Sampler", "kind": "dpmpp_2m", "eta": 0.0, "steps": 10, "guidance_scale": 1.25}
    assert ev.sampler_config(legacy, {"steps": 4}) == {"_target_": "ddlab.diffusion.samplers.dpmpp_2m", "steps": 4,
                                                       "guidance_scale": 1.25}
    with pytest.raises(ValueError, match="sampler=<name>"):
        ev.sampler_config(None, {"steps": 3})


@pytest.mark.slow
def test_sample_fid_nll_and_callbacks_agree(run, tmp_path, inception_weights):
    """One checkpoint, one seed: ddlab.fid draws the images ddlab.sample draws, and its bits/dim equal
    ddlab.nll's and the val/bpd callback's (three batch sizes: 4, 2 and the callback's 4)."""
    ckpt = run / "checkpoints" / "last.ckpt"
    s = _sample(ckpt, tmp_path / "s", "n=6", "batch_size=4", "seed=3")
    fid = evaluate(compose([f"ckpt={ckpt}", "n=6", "batch_size=4", "seed=3", "bpd.n=4", "bpd.batch_size=2", "progress=false",
                            f"fid.weights_path={inception_weights}", f"fid.cache_dir={tmp_path / 'cache'}", "fid.kid=false",
                            "fid.isc=false", "reference.limit=4", f"out={tmp_path / 'f'}"], config_name="fid"))
    with np.load(tmp_path / "f" / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], s["images"])
        np.testing.assert_array_equal(z["arr_1"], s["labels"])
    assert sorted(np.bincount(s["labels"], minlength=10).tolist()) == [0] * 4 + [1] * 6  # balanced classes
    assert fid["sampler"]["name"] == "dpmpp_2m" and fid["sampler"]["guidance_scale"] == 1.5

    rec = nll(compose([f"ckpt={ckpt}", f"out={tmp_path / 'nll'}", "n=4", "batch_size=4", "seed=3", "progress=false"],
                      config_name="nll"))
    assert rec["bpd_clip_x0"] is True and rec["bpd_n"] == fid["bpd_n"] == 4
    assert rec["bpd"] == pytest.approx(rec["bpd_prior"] + rec["bpd_vb"] + rec["bpd_decoder"], rel=1e-6)
    seed0 = nll(compose([f"ckpt={ckpt}", f"out={tmp_path / 'nll0'}", "n=4", "batch_size=4", "progress=false"], config_name="nll"))
    callback = json.loads((run / "metrics.json").read_text())  # val/bpd (seed 0) of the EMA weights saved in last.ckpt
    for k in ("bpd", "bpd_prior", "bpd_decoder", "bpd_vb"):
        assert fid[k] == pytest.approx(rec[k], rel=1e-6, abs=1e-9), k
        assert callback[f"val/{k}"] == pytest.approx(seed0[k], rel=1e-6, abs=1e-6), k
    assert seed0["bpd"] != rec["bpd"]  # the seed is used


def test_bits_per_dim_leaves_the_global_rng_alone(run):
    from ddlab.checkpoint import load_checkpoint

    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    data = [(torch.rand(1, 32, 32) * 2 - 1, i) for i in range(3)]
    state = torch.get_rng_state()
    a = ev.bits_per_dim(loaded.model, loaded.diffusion, data, range(3), batch_size=2, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    b = ev.bits_per_dim(loaded.model, loaded.diffusion, data, [2, 0], batch_size=1, seed=1)  # image i keeps its noise
    assert b["bpd"].tolist() == pytest.approx([a["bpd"][2].item(), a["bpd"][0].item()], rel=1e-6)


def test_fid_refuses_a_size_mismatch_before_any_compute(run, tmp_path):
    npz = tmp_path / "s28.npz"
    np.savez(npz, arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    cfg = compose([f"samples={npz}", "data=mnist", "fid.weights_path=/nonexistent.pth", f"out={tmp_path}"], config_name="fid")
    with pytest.raises(ValueError, match=r"28x28 px.*32x32 px.*resize=true"):
        evaluate(cfg)  # the missing Inception weights would fail later: the size check comes first
    bad = tmp_path / "float.npz"
    np.savez(bad, arr_0=np.zeros((4, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        evaluate(compose([f"samples={bad}", "data=mnist", "fid.weights_path=/nonexistent.pth", f"out={tmp_path}"], config_name="fid"))
    with pytest.raises(ValueError, match="channel"):
        np.savez(npz, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
        evaluate(cfg)


def test_reference_cache_with_another_feature_size_is_recomputed(tmp_path, caplog):
    from ddlab.metrics import reference_stats, save_stats

    feats = np.random.default_rng(0).normal(size=(5, 3))
    save_stats(tmp_path / "k.npz", "k", np.zeros(4), np.eye(4), 5)  # a 4-d file where the extractor gives 3-d features
    st = reference_stats("k", tmp_path, lambda: feats, feature_dim=3)
    assert st.status == "corrupt" and st.mu.shape == (3,) and "3-d features" in caplog.text
    np.testing.assert_allclose(st.mu, feats.mean(0))
    assert reference_stats("k", tmp_path, lambda: 1 / 0, feature_dim=3).status == "hit"  # rewritten, then read back
