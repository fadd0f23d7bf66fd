"""`make bench` smoke run: the benchmark runs end to end on tiny sizes and writes a well-formed JSON.

This checks the harness, never a speed: every figure only has to be a positive, finite number.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAT_KEYS = {"median", "q25", "q75", "min", "max", "n", "values"}


def _check_stat(s: dict, where: str) -> None:
    assert set(s) == STAT_KEYS, where
    assert s["n"] == len(s["values"]) >= 1, where
    for v in s["values"] + [s["median"], s["q25"], s["q75"], s["min"], s["max"]]:
        assert math.isfinite(v) and v > 0, f"{where}: {v}"
    assert s["min"] <= s["q25"] <= s["median"] <= s["q75"] <= s["max"], where


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # this checkout's benchmarks/ and src/ (not an installed ddlab from another checkout)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--out", str(out), "--only", "train,sampling,data,scaling",
           "--sample-repeats", "3"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), proc.stdout, files[0]


@pytest.mark.slow
def test_quick_bench_schema(quick_result):
    res, stdout, path = quick_result
    assert path.name == f"{res['machine']['host']}-{res['started'][:10]}.json"
    assert res["schema"] == "ddlab-bench/1"
    for key in ("host", "cpu_count", "torch", "lightning", "device", "torch_threads"):
        assert key in res["machine"]
    assert res["settings"]["quick"] is True

    assert res["train"], res["notes"]
    for r in res["train"]:
        for k in ("ddlab_images_per_s", "bare_images_per_s", "ratio", "ddlab_step_ms", "bare_step_ms"):
            _check_stat(r[k], f"train {r['preset']} {k}")
        assert r["params"] > 0 and r["batch_size"] > 0
        for k in ("ddlab_peak_memory_mb", "bare_peak_memory_mb"):
            assert r[k] is None or (math.isfinite(r[k]) and r[k] >= 0)

    kinds = {(r["kind"], r["guidance_scale"]) for r in res["sampling"]}
    assert {("ddim", 1.0), ("ddpm", 1.0)} <= kinds and len(kinds) == 4
    for r in res["sampling"]:
        for k in ("ddlab_images_per_s", "diffusers_images_per_s", "ratio", "guidance_cost"):
            _check_stat(r[k], f"sampling {r['kind']} w={r['guidance_scale']} {k}")
        assert r["ddlab_images_per_s"]["n"] == 3  # --sample-repeats, apart from the other sections' 2
        if r["guidance_scale"] != 1.0:  # both guidance batchings are timed; the CPU default is split
            assert r["guidance_batching"] == "split"
            for k in ("guidance_cost_joint", "guidance_cost_split", "diffusers_guidance_cost"):
                _check_stat(r[k], f"sampling {r['kind']} {k}")
            assert r["guidance_cost"] == r["guidance_cost_split"]

    mnist = [r for r in res["data"] if r["data"] == "mnist"]
    assert mnist, res["notes"]
    _check_stat(mnist[0]["delivered_images_per_s"], "data mnist delivered")
    _check_stat(mnist[0]["train_step_images_per_s"], "data mnist consumed")
    assert isinstance(mnist[0]["data_bound"], bool)

    axes = {r["axis"] for r in res["scaling"]}
    assert {"batch", "image_size"} <= axes
    for r in res["scaling"]:
        _check_stat(r["step_ms"], f"scaling {r['axis']}")

    # the printed markdown has one table per section
    for header in ("**Training**", "**Sampling**", "**Data loading**", "**Scaling**", "| preset | px |"):
        assert header in stdout
