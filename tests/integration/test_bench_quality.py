"""`make bench-quality` smoke run: both systems train for seconds, sample, and get scored end to end.

A harness check, never a quality or speed assertion: figures only have to be well-formed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_quality_bench_runs_end_to_end(tmp_path, mnist_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DDLAB_DATA_DIR=str(mnist_dir))
    cmd = [sys.executable, "-m", "benchmarks.quality", "--quick", "--budget", "6", "--samples", "20", "--baseline-steps", "3",
           "--threads", "1", "--out", str(tmp_path), "--search", "--search-budget", "1", "--search-samples", "10",
           "--search-steps", "2", "--ddlab-samplers", "ddim:2:1.5", "--baseline-samplers", "ddim:2:1,ddim:3:1.25", "--sample-batch", "8"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = list(tmp_path.glob("quality-*.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())
    systems = [r["system"] for r in res["rows"]]
    assert systems == ["ddlab", "ddlab", "diffusers baseline", "diffusers baseline"]
    assert [(r["sampler"]["steps"], r["sampler"]["guidance_scale"]) for r in res["rows"][2:]] == [(3, 1.25), (2, 1.0)]  # ddim:3:1.25 is the default, scored once
    assert [(r["sampler"]["kind"], r["sampler"]["steps"], r["sampler"]["guidance_scale"]) for r in res["rows"][:2]] == [
        ("dpmpp_2m", 4, 2.5), ("ddim", 2, 1.5)]
    # training figures of the ddlab run: the data batch (not eval's) and the optimizer steps (not the sampler's)
    metrics = json.loads((Path(res["grids"]) / "ddlab" / "metrics.json").read_text())
    for r in res["rows"][:2]:
        assert r["batch_size"] == 64 and r["steps"] == metrics["global_step"]
        assert r["images_per_s"] == pytest.approx(metrics["global_step"] * 64 / 6)
    for r in res["rows"]:
        assert r["num_samples"] == 20
        assert math.isfinite(r["fid"]) and r["fid"] >= 0
        assert 0 <= r["class_accuracy"] <= 1 and 0 <= r["class_entropy"] <= math.log(10) + 1e-9
        assert r["sampling_seconds"] > 0 and r["images_per_s"] > 0 and r["params"] > 0
    assert len(res["search"]) == 7  # lr x2, batch x2, width x2 around the starting point
    assert "| diffusers baseline |" in res["markdown"] and "| ddlab |" in proc.stdout
    grids = Path(res["grids"])
    assert (grids / "baseline.png").is_file() and (grids / "ddlab_dpmpp_2m4_w2.5.png").is_file()
    assert (grids / "ddlab_ddim2_w1.5.png").is_file() and (grids / "baseline_ddim2_w1.png").is_file()
    saved = torch.load(grids / "baseline_ema.pt", weights_only=False)
    assert saved["settings"]["lr"] > 0 and saved["ema_state_dict"]


def test_sampler_specs_parse_and_reject_clearly():
    from benchmarks.quality import parse_sampler_spec

    assert parse_sampler_spec("20") == (None, 20, None)
    assert parse_sampler_spec("dpmpp_2m:10") == ("dpmpp_2m", 10, None)
    assert parse_sampler_spec("ddim:50:2.5") == ("ddim", 50, 2.5)
    for bad in ("ddim:ten", "a:1:b", "1:2:3:4", ""):
        with pytest.raises(SystemExit, match="kind:steps:guidance"):
            parse_sampler_spec(bad)


@pytest.mark.slow
def test_saved_baseline_rescores_to_the_same_samples(tmp_path, mnist_dir):
    """A baseline_ema.pt re-scored with --baseline-ckpt draws the very samples of its first scoring."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), DDLAB_DATA_DIR=str(mnist_dir))
    common = [sys.executable, "-m", "benchmarks.quality", "--quick", "--systems", "baseline", "--samples", "20",
              "--baseline-steps", "3", "--threads", "1", "--sample-batch", "8"]
    first = subprocess.run([*common, "--budget", "3", "--out", str(tmp_path / "a")], check=False, cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    res_a = json.loads(next((tmp_path / "a").glob("quality-*.json")).read_text())
    ckpt = Path(res_a["grids"]) / "baseline_ema.pt"
    second = subprocess.run([*common, "--baseline-ckpt", str(ckpt), "--classifier", str(ckpt.parent / "mnist_cnn.pt"),
                             "--out", str(tmp_path / "b")], check=False, cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    res_b = json.loads(next((tmp_path / "b").glob("quality-*.json")).read_text())
    (a,), (b,) = res_a["rows"], res_b["rows"]
    assert (b["steps"], b["params"], b["settings"]) == (a["steps"], a["params"], a["settings"])
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-6) and b["class_accuracy"] == a["class_accuracy"]


def test_bad_sampler_specs_fail_before_training(tmp_path):
    from benchmarks.quality import main

    with pytest.raises(SystemExit, match="--baseline-samplers: the baseline samples with ddim"):
        main(["--systems", "baseline", "--baseline-samplers", "dpmpp_2m:10", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--baseline-samplers: cannot read"):
        main(["--systems", "baseline", "--baseline-samplers", "ddim:x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="cannot be combined with --search"):
        main(["--baseline-ckpt", "b.pt", "--search", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written
