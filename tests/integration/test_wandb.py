"""W&B in offline mode: the files it writes hold the config, the metrics and the sample images; a
resume continues the same run; a failing fit still closes the run (marked failed)."""

import json
import struct
import time

import pytest
import torch

from ddlab.train import train
from tests.conftest import compose

TINY = [
    "model.base_channels=8", "model.channel_mult=[1,2]", "scheduler.num_timesteps=50", "sampler.steps=2",
    "sampler.progress=false", "data.limit=32", "data.val_limit=8", "data.batch_size=16", "trainer.max_time=null",
    "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.progress_bar=null",
    "callbacks.sample_grid.n=4", "module.lr_scheduler.warmup_steps=1", "logger=wandb", "name=wb_test", "tags=[t1,t2]",
]


def wandb_records(run_file):
    """Decode a .wandb transaction log with an independent reader of its block format (W&B header
    ':W&B', then 32 KiB blocks of records: crc32 u32, length u16, type u8 = full/first/middle/last)
    and W&B's own protobuf ``Record`` schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def read_run(out_dir, wait_s=60.0):
    """{'run_id', 'group', 'tags', 'config', 'history' (list of dicts), 'exit_code', 'images'} of the
    single offline run under ``out_dir``. W&B's service process writes the file asynchronously and
    may still be flushing it when ``wandb.finish`` returns: wait for the exit record."""
    deadline, run = time.monotonic() + wait_s, None
    while True:
        try:
            run = _read_run(out_dir)
            if run["exit_code"] is not None and "run_id" in run:
                return run
        except Exception:  # a record still being written
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline and run is not None:
            return run
        time.sleep(0.5)


def _read_run(out_dir):
    (run_dir,) = sorted((out_dir / "wandb").glob("offline-run-*"))
    (run_file,) = run_dir.glob("run-*.wandb")
    run = {"config": {}, "history": [], "exit_code": None, "dir": run_dir}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(run_id=r.run.run_id, group=r.run.run_group, tags=list(r.run.tags))
        elif kind == "config":
            for item in r.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            run["history"].append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item})
        elif kind == "exit":
            run["exit_code"] = r.exit.exit_code
    run["images"] = sorted(p.name for p in (run_dir / "files" / "media" / "images").glob("*.png"))
    return run


def test_offline_run_has_config_metrics_and_images(tmp_path):
    cfg = compose(TINY + ["trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=2",
                          "callbacks.checkpoint.every_n_steps=2"], output_dir=tmp_path)
    loss = train(cfg)
    run = read_run(tmp_path)
    assert run["group"] == "wb_test" and run["tags"] == ["t1", "t2"] and run["exit_code"] == 0
    c = run["config"]
    # the resolved config, parameter counts, typed overrides and the commit
    assert c["model"]["base_channels"] == 8 and c["scheduler"]["num_timesteps"] == 50 and c["data"]["batch_size"] == 16
    n_params = sum(p.numel() for p in torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu",
                                                  weights_only=False)["state_dict"].values()) // 2  # model + EMA copy
    assert c["params/total"] == n_params
    assert "overrides" in c and len(c["git_commit"]) >= 7
    keys = set().union(*run["history"])
    for k in ("train/loss", "train/mse", "train/loss_q0", "train/grad_norm", "train/ema_decay", "train/images_per_sec",
              "lr-AdamW", "val/mse", "trainer/global_step"):
        assert k in keys, k
    last_loss = [h["train/loss"] for h in run["history"] if "train/loss" in h][-1]
    assert last_loss == pytest.approx(loss)
    grids = [h for h in run["history"] if "samples/filenames" in h or "samples" in h]
    assert [h["trainer/global_step"] for h in grids] == [2, 4]  # grids logged with their step
    assert len(run["images"]) == 2
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["wandb"]["run_id"] == run["run_id"]


def test_resume_continues_the_same_run(tmp_path):
    run1, run2 = tmp_path / "a", tmp_path / "b"
    train(compose(TINY + ["trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0"], output_dir=run1))
    first = read_run(run1)
    train(compose(TINY + ["trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=0",
                          f"ckpt_path={run1 / 'checkpoints' / 'last.ckpt'}"], output_dir=run2))
    second = read_run(run2)
    assert second["run_id"] == first["run_id"] and second["exit_code"] == 0
    steps = [h["trainer/global_step"] for h in second["history"] if "train/loss" in h]
    assert steps and min(steps) >= 2  # continues after the checkpoint's step


def test_failing_fit_still_finishes_the_run(tmp_path):
    import wandb

    from ddlab.training import DiffusionModule

    orig = DiffusionModule.training_step

    def boom(self, batch, batch_idx):
        if self.global_step == 1:
            raise RuntimeError("simulated failure at step 1")
        return orig(self, batch, batch_idx)

    DiffusionModule.training_step = boom
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            train(compose(TINY + ["trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=0"], output_dir=tmp_path))
    finally:
        DiffusionModule.training_step = orig
    assert wandb.run is None  # closed: the next job of a sweep starts a fresh run
    run = read_run(tmp_path)
    assert run["exit_code"] == 1 and any("train/loss" in h for h in run["history"])
