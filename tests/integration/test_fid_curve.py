"""ddlab.fid_curve end to end on a tiny checkpoint: every point draws the same labels and start noise,
its NFE is the number of network forwards per image actually run, and wrong inputs are refused
before anything is drawn."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddlab import evaluation as ev
from ddlab.fid_curve import curve
from ddlab.fid_curve_plot import PANEL_H
from ddlab.train import train
from tests.conftest import compose
from tests.integration.test_train import TINY

# guidance 1.5 and split batching stored in the checkpoint: every guided step is two forwards
RUN = TINY + ["trainer.max_epochs=1", "scheduler.num_timesteps=20", "sampler=dpmpp_2m",
              "sampler.steps=3", "sampler.guidance_scale=1.5", "sampler.guidance_batching=split", "sampler.progress=false",
              "logger=csv", "callbacks.fid=null", "callbacks.bpd=null", "callbacks.sample_grid=null", "data.limit=32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("curve_run")
    train(compose(RUN, output_dir=out))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """An untrained mnist_cnn: the features are arbitrary but every scoring path (FID, accuracy) runs."""
    from ddlab.metrics.classifier import MnistCNN, save_classifier

    torch.manual_seed(0)
    return save_classifier(MnistCNN(), tmp_path_factory.mktemp("cnn") / "mnist_cnn.pt", accuracy=0.0)


def _cfg(ckpt, cnn, out, *extra):
    return compose([f"ckpt={ckpt}", f"out={out}", "n=4", "batch_size=4", "seed=5", "progress=false",
                    "fid.feature_extractor=mnist_cnn", f"fid.classifier_path={cnn}", f"fid.cache_dir={out / 'cache'}",
                    "reference.limit=8", *extra], config_name="fid_curve")


@pytest.fixture
def recorder(monkeypatch):
    """Wraps ev.generate_uint8: per call, the labels, seed and the network's input rows per image."""
    calls, original = [], ev.generate_uint8

    def spy(model, diffusion, sampler, n, batch_size, labels=None, seed=0, **kw):
        rows = []
        hook = model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
        try:
            images = original(model, diffusion, sampler, n, batch_size, labels=labels, seed=seed, **kw)
        finally:
            hook.remove()
        calls.append({"labels": labels.clone(), "seed": seed, "forwards_per_image": sum(rows) / n, "images": images})
        return images

    monkeypatch.setattr(ev, "generate_uint8", spy)
    return calls


def test_curve_points_share_labels_and_seeds_and_count_real_forwards(ckpt, cnn, tmp_path, recorder):
    out = tmp_path / "curve"
    rec = curve(_cfg(ckpt, cnn, out, "samplers=[dpmpp_2m,heun]", "steps=[1,2]"))
    pts = rec["points"]
    assert [(p["sampler"], p["steps"]) for p in pts] == [("dpmpp_2m", 1), ("dpmpp_2m", 2), ("heun", 1), ("heun", 2)]
    # NFE in the record = forwards per image the network really ran (guidance 1.5 counted)
    assert [p["nfe"] for p in pts] == [c["forwards_per_image"] for c in recorder]
    assert all(p["guidance_scale"] == 1.5 for p in pts)
    # the same labels (balanced classes) and seed at every point
    assert len(recorder) == 4 and all(c["seed"] == 5 for c in recorder)
    for c in recorder[1:]:
        torch.testing.assert_close(c["labels"], recorder[0]["labels"], rtol=0, atol=0)
    assert sorted(np.bincount(recorder[0]["labels"].numpy(), minlength=10).tolist()) == [0] * 6 + [1] * 4
    for p in pts:
        assert np.isfinite(p["fid"]) and 0.0 <= p["class_accuracy"] <= 1.0 and p["seconds"] >= 0
    # the files: JSON as returned, one table row per point, a PNG with a second (accuracy) panel
    assert json.loads((out / "curve.json").read_text())["points"] == json.loads(json.dumps(pts))
    rows = [r for r in (out / "curve.md").read_text().splitlines() if r.startswith("| ") and not r.startswith("| sampler")]
    assert [r.split("|")[1:4] for r in rows] == [[f" {p['sampler']} ", f" {p['steps']} ", f" {p['nfe']} "] for p in pts]
    assert all(f"{p['class_accuracy']:.3f}" in r for p, r in zip(pts, rows))
    with Image.open(out / "curve.png") as img:
        assert img.height >= 2 * PANEL_H  # the FID panel and the accuracy panel


def test_joint_guidance_batching_counts_the_same_forwards(ckpt, cnn, tmp_path, recorder):
    """One forward of twice the batch (joint) is still two network evaluations per image."""
    rec = curve(_cfg(ckpt, cnn, tmp_path / "j", "samplers=[euler]", "steps=[2]", "sampler.guidance_batching=joint",
                     "sampler.guidance_scale=2"))
    assert rec["points"][0]["nfe"] == recorder[0]["forwards_per_image"] and rec["points"][0]["guidance_scale"] == 2.0


@pytest.mark.parametrize("extra, match", [
    (["samplers=[dpmpp_2m,nope]", "steps=[5]"], r"unknown sampler\(s\) \['nope'\]; choose from .*ddim.*heun"),
    (["samplers=[heun]", "steps=[0,5]"], r"steps: every step count must be an integer >= 1, got \[0\]"),
    (["sampler=heun"], r"samplers=\[a,b,...\]"),
    (["sampler.steps=4"], r"steps=\[5,10,...\]"),
    (["samplers=[euler]", "steps=[5]", "+sampler.eta=0.5"], r"samplers=euler, steps=5: sampler.eta: not an option"),
])
def test_bad_inputs_are_refused_before_sampling(ckpt, cnn, tmp_path, recorder, extra, match):
    with pytest.raises(ValueError, match=match):
        curve(_cfg(ckpt, cnn, tmp_path / "bad", *extra))
    assert recorder == [] and not (tmp_path / "bad").exists()


def test_discrete_samplers_are_refused_on_edm():
    """ddim steps a discrete VP process; on EDM it is refused up front, while Heun runs (NFE 2N - 1)."""
    from ddlab.diffusion import EDM

    edm = EDM()
    with pytest.raises(ValueError, match="ddim.*not; use a sigma-space sampler"):
        ev.sampler_nfe(ev.build_sampler(ev.named_sampler_config(None, "ddim", {"steps": 5})), False, edm)
    assert ev.sampler_nfe(ev.build_sampler(ev.named_sampler_config(None, "heun", {"steps": 5})), True, edm) == 2 * (2 * 5 - 1)


def test_plot_ticks():
    from ddlab.fid_curve_plot import linear_ticks, log_ticks

    assert log_ticks(5, 100) == [5, 10, 20, 50, 100]
    assert log_ticks(10, 38) == [10, 20, 30]  # 1-2-5 gives two: every integer mantissa
    ticks = linear_ticks(0.27, 0.29)
    assert ticks[0] <= 0.27 and ticks[-1] >= 0.29 and 3 <= len(ticks) <= 8
