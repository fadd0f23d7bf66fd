"""Optimisation settings: LR warm-up and anneal shapes (closed forms), fp16 skipped-step counting."""

import math
from types import SimpleNamespace

import pytest

from ddlab.diffusion import GaussianDiffusion, Sampler
from ddlab.models import UNet
from ddlab.training import DiffusionModule, lr_lambda


def test_warmup_is_linear_then_constant():
    f = lr_lambda(warmup=4, schedule="constant", total=None)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_anneal_shapes(schedule):
    w, total, m = 10, 110, 0.1
    f = lr_lambda(warmup=w, schedule=schedule, total=total, min_ratio=m)
    assert f(w - 1) == pytest.approx(1.0) and f(w) == pytest.approx(1.0)
    assert f(total) == pytest.approx(m) and f(total + 50) == pytest.approx(m)  # clamped after the end
    for s in (20, 35, 60, 95):
        frac = (s - w) / (total - w)
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
        assert f(s) == pytest.approx(m + (1 - m) * decay)
    values = [f(s) for s in range(w, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def _module(**kw):
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,), num_classes=0)
    return DiffusionModule(model=net, diffusion=GaussianDiffusion(num_timesteps=10), sampler=Sampler(steps=2, progress=False), **kw)


def test_annealing_without_a_known_length_is_an_error():
    m = _module(lr_schedule="cosine")
    m._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="module.lr_schedule=cosine .* set module.total_steps"):
        m.configure_optimizers()
    m._trainer = SimpleNamespace(estimated_stepping_batches=40)  # from max_epochs x batches / accumulation
    sched = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sched.lr_lambdas[0].total == 40


class _Scaler:
    def __init__(self, scales):
        self.scales = list(scales)

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scales.pop(0)


def test_fp16_skipped_steps_are_counted_and_logged():
    """GradScaler halves its scale when it skips a step with non-finite gradients; each halving counts."""
    m = _module()
    logged = []
    m.log = lambda name, value, **kw: logged.append((name, value))
    m._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=_Scaler([65536.0, 65536.0, 32768.0, 32768.0, 16384.0, 32768.0])))
    for i in range(6):
        m.on_train_batch_end(None, None, i)
    assert m.skipped_steps == 2
    assert [v for k, v in logged if k == "train/skipped_steps"] == [0, 0, 1, 1, 2, 2]
    ck = {}
    m.on_save_checkpoint(ck)
    fresh = _module()
    fresh.on_load_checkpoint(ck)
    assert fresh.skipped_steps == 2
