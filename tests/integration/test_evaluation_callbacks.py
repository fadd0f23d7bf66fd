"""Training callbacks on the evaluation core: the FID callback samples with the run's sampler config
(guidance_batching included), and training runs without a progress bar."""

from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddlab.train import train
from ddlab.training import FIDCallback
from tests.conftest import compose
from tests.integration.test_train import TINY


def _fake_run(batching: str):
    cfg = compose(TINY + ["scheduler.num_timesteps=10", "sampler=ddim", "sampler.steps=7", "sampler.guidance_scale=3",
                          f"sampler.guidance_batching={batching}", "data.image_size=8", "model.image_size=8"], output_dir="unused")
    run_config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    net = instantiate(cfg.model).eval()
    calls = []
    net.register_forward_hook(lambda m, args, out: calls.append((len(args[0]), args[2].tolist())))
    module = SimpleNamespace(hparams={"run_config": run_config}, ema_model=net, diffusion=instantiate(cfg.scheduler),
                             num_classes=int(cfg.model.num_classes), device=torch.device("cpu"), sampler=None)
    trainer = SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True)
    return module, trainer, calls


@pytest.mark.parametrize("batching", ["split", "joint"])
def test_fid_callback_samples_with_the_runs_sampler_config(batching):
    module, trainer, calls = _fake_run(batching)
    cb = FIDCallback(every_n_epochs=1, num_samples=3, steps=2, batch_size=3)
    images = cb.sample_all_ranks(trainer, module)
    assert images.shape == (3, 8, 8, 1)
    assert len({y for _, ys in calls for y in ys if y == 10}) == 1  # guidance 3: the null class (10) is evaluated
    # steps=2 replaced the run's 7; the run's guidance_batching decides how the two passes run
    if batching == "split":
        assert len(calls) == 2 * 2 and all(b == 3 for b, _ in calls)
    else:
        assert len(calls) == 2 and all(b == 6 for b, _ in calls)


def test_training_without_a_progress_bar(tmp_path):
    overrides = [o for o in TINY if not o.startswith("callbacks.progress_bar")]
    cfg = compose(overrides + ["trainer.enable_progress_bar=false", "trainer.max_steps=1", "callbacks.sample_grid.at_end=false",
                               "trainer.limit_val_batches=0"], output_dir=tmp_path)
    train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_training_without_a_logger(tmp_path):
    """``logger=none``: the LR monitor (which needs a logger) is left out instead of crashing the run."""
    cfg = compose(TINY + ["logger=none", "trainer.max_steps=1", "callbacks.sample_grid.at_end=false",
                          "trainer.limit_val_batches=0"], output_dir=tmp_path)
    train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
