"""End-to-end training on the real MNIST files: fast_dev_run, checkpoints, resume."""


import pytest
import torch

from ddlab.train import train
from tests.conftest import compose

TINY = [
    "model.base_channels=8",
    "model.channel_mult=[1,2]",
    "scheduler.num_timesteps=50",
    "sampler.steps=4",
    "sampler.progress=false",
    "data.limit=64",
    "data.val_limit=16",
    "data.batch_size=16",
    "trainer.max_time=null",
    "callbacks.progress_bar=null",
    "trainer.limit_val_batches=1",
    "callbacks.sample_grid.n=10",
    "callbacks.sample_grid.every_n_steps=0",
    "module.lr_scheduler.warmup_steps=2",
]


def test_fast_dev_run(tmp_path):
    cfg = compose(TINY + ["debug=default"], output_dir=tmp_path)
    train(cfg)
    assert (tmp_path / "samples" / "step_000001.png").is_file()


@pytest.mark.slow
def test_two_epochs_then_resume(tmp_path):
    run1 = tmp_path / "run1"
    cfg = compose(TINY + ["trainer.max_epochs=2", "callbacks.checkpoint.every_n_steps=4"], output_dir=run1)
    train(cfg)
    last = run1 / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert sorted(p.name for p in (run1 / "samples").iterdir()) == ["step_000008.png"]
    assert (run1 / "csv" / "metrics.csv").is_file() and (run1 / "metrics.json").is_file()
    ck = torch.load(last, map_location="cpu", weights_only=False)
    assert ck["global_step"] == 8  # 2 epochs x 64 images / batch 16
    ema = {k: v for k, v in ck["state_dict"].items() if k.startswith("ema_model.")}
    live = {k: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    assert ema and any(not torch.equal(ema["ema_model." + k[6:]], v) for k, v in live.items())
    assert ck["optimizer_states"] and ck["lr_schedulers"]

    # resume: continues from step 8 with optimizer, LR scheduler and EMA restored
    run2 = tmp_path / "run2"
    cfg2 = compose(TINY + ["trainer.max_epochs=3", f"ckpt_path={last}"], output_dir=run2)
    seen = {}

    from lightning.pytorch.callbacks import Callback

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["ema"] = {k: v.clone() for k, v in pl_module.ema_model.state_dict().items()}
            seen["lr_step"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch
            seen["opt_state"] = len(trainer.optimizers[0].state)

    import ddlab.train as tr

    orig = tr.instantiate_dict

    def with_probe(node):
        out = orig(node)
        return out + [Probe()] if node is not None and "ema" in node else out

    tr.instantiate_dict = with_probe
    try:
        train(cfg2)
    finally:
        tr.instantiate_dict = orig
    assert seen["step"] == 8 and seen["lr_step"] == 8 and seen["opt_state"] > 0
    for k, v in ema.items():
        torch.testing.assert_close(seen["ema"][k[len("ema_model."):]], v)
    ck2 = torch.load(run2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck2["global_step"] == 12


def test_bf16_mixed_on_cpu_keeps_schedules_in_float64(tmp_path):
    cfg = compose(TINY + ["trainer.precision=bf16-mixed", "trainer.max_steps=3", "callbacks.sample_grid=null"], output_dir=tmp_path)
    train(cfg)
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    rows = (tmp_path / "metrics.json").read_text()
    assert "train/loss" in rows
    from ddlab.diffusion import GaussianDiffusion

    d = GaussianDiffusion(num_timesteps=50)
    assert d.alphas_cumprod.dtype == torch.float64  # cast only when indexed, never stored in half


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    # 64 images / batch 16 = 4 batches per epoch; accumulating 2 gives 2 optimizer steps (and LR/EMA updates) per epoch
    cfg = compose(TINY + ["trainer.accumulate_grad_batches=2", "trainer.max_epochs=2", "callbacks.sample_grid=null"], output_dir=tmp_path)
    train(cfg)
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 4
    assert ck["lr_schedulers"][0]["last_epoch"] == 4
