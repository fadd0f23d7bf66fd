"""Hydra multirun sweeps through the real CLI (`python -m ddlab.train -m ...` in a subprocess):
one folder per job, the summary table, an Optuna search, a failing job that does not stop the rest."""

import csv
import json
import os
import subprocess
import sys

import yaml

from tests.conftest import ROOT

TINY = [
    "model.base_channels=8", "model.channel_mult=[1,2]", "scheduler.num_timesteps=50", "sampler.steps=2",
    "sampler.progress=false", "data.limit=32", "data.val_limit=8", "data.batch_size=16", "trainer.max_time=null",
    "trainer.max_steps=2", "trainer.limit_val_batches=1", "callbacks.progress_bar=null", "callbacks.sample_grid.n=2",
    "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_steps=0", "module.lr_scheduler.warmup_steps=1",
    "torch_threads=1",
]


def run_cli(args, cwd, timeout=300):
    env = {**os.environ, "DDLAB_LOG_DIR": str(cwd / "logs")}
    return subprocess.run([sys.executable, "-m", "ddlab.train", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=timeout)


def test_grid_multirun_writes_one_folder_per_job_and_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", *TINY, "scheduler=linear,cosine", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for job, sched in (("0", "linear"), ("1", "cosine")):
        d = sweep / job
        assert f"scheduler={sched}" in yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        assert yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["scheduler"]["schedule"] == sched
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["global_step"] == 2
        ret = json.loads((d / "job_return.json").read_text())
        assert ret["status"] == "completed" and ret["return_value"] == metrics["train/loss"]  # optimized_metric
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert [r["overrides"].split()[-1] for r in rows] == ["scheduler=linear", "scheduler=cosine"]
    for row, job in zip(rows, ("0", "1")):
        m = json.loads((sweep / job / "metrics.json").read_text())
        assert float(row["train/loss"]) == m["train/loss"] and int(float(row["global_step"])) == 2
    md = (sweep / "summary.md").read_text().splitlines()
    assert md[0].startswith("| job | overrides | status | return_value |") and "train/loss" in md[0]
    assert "| 0 | scheduler=linear | completed |" in md[2] and "| 1 | scheduler=cosine | completed |" in md[3]


def test_failing_job_is_summarised_and_the_other_job_still_runs(tmp_path):
    sweep = tmp_path / "sweep"
    # job 0 fails in the model constructor (unknown block), job 1 trains
    r = run_cli(["-m", *TINY, "model.blocks=[rez],[res]", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode != 0  # the sweep reports the failure ...
    assert (sweep / "1" / "metrics.json").is_file()  # ... after every job ran
    rows = {r["job"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert rows["0"]["status"] == "failed" and "rez" in rows["0"]["error"]
    assert rows["1"]["status"] == "completed" and float(rows["1"]["train/loss"]) > 0


def test_optuna_two_trials_returns_the_best_metric(tmp_path):
    sweep = tmp_path / "optuna"
    r = run_cli(["hparams_search=mnist_optuna", *TINY, "trainer.max_steps=2", "optimized_metric=train/loss",
                 "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
                 "scheduler=linear",  # fixed: the search runs over the other params
                 f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    values = [json.loads((sweep / j / "metrics.json").read_text())["train/loss"] for j in ("0", "1")]
    lrs = [yaml.safe_load((sweep / j / ".hydra" / "config.yaml").read_text())["module"]["optimizer"]["lr"] for j in ("0", "1")]
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs) and lrs[0] != lrs[1]  # drawn from the search space
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(values)
    assert abs(best["best_params"]["module.optimizer.lr"] - lrs[values.index(min(values))]) < 1e-12
    assert len(list(csv.DictReader((sweep / "summary.csv").open()))) == 2


def test_failed_optuna_trial_is_reported_not_fatal(tmp_path):
    sweep = tmp_path / "optuna"
    # val/fid is never logged (FID is off): each trial fails with a message naming the key; on_error=inf turns it
    # into +inf for Optuna and the study completes
    r = run_cli(["hparams_search=mnist_optuna", *TINY, "hydra.sweeper.n_trials=1",
                 "scheduler=linear",  # fixed: the search runs over the other params
                 f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "optimized_metric=val/fid was not logged" in r.stdout + r.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == float("inf")
    assert json.loads((sweep / "0" / "job_return.json").read_text())["return_value"] == "inf"


def test_overrides_are_typed_and_the_commit_is_recorded():
    from ddlab.sweep import git_commit, parse_overrides

    typed = parse_overrides(["model=unet_res", "module.lr=1e-3", "model.channel_mult=[1,2]", "seed=0", "ckpt_path=null",
                             "+foo.bar=true"])
    assert typed == {"model": "unet_res", "module.lr": 0.001, "model.channel_mult": [1, 2], "seed": 0, "ckpt_path": None,
                     "+foo.bar": True}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    assert git_commit().split("-")[0] == head


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        c = compose(config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                    return_hydra_config=True)
    assert c.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert c.hydra.launcher.partition == "gpu" and c.hydra.launcher.gpus_per_node == 1
    assert c.hydra.callbacks.sweep_summary._target_ == "ddlab.sweep.SweepSummary"
