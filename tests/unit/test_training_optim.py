"""Optimisation settings: LR warm-up and anneal shapes (closed forms), optimizer/schedule targets,
fp16 skipped-step counting, the non-finite-loss advice."""

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from ddlab.diffusion import GaussianDiffusion, Sampler
from ddlab.models import UNet
from ddlab.training import DiffusionModule, NonFiniteLossError, WarmupDecay, warmup_decay


def test_warmup_is_linear_then_constant():
    f = WarmupDecay(warmup_steps=4, decay="constant")
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_anneal_shapes(decay):
    w, total, m = 10, 110, 0.1
    f = WarmupDecay(warmup_steps=w, decay=decay, total_steps=total, min_lr_ratio=m)
    assert f(w - 1) == pytest.approx(1.0) and f(w) == pytest.approx(1.0)
    assert f(total) == pytest.approx(m) and f(total + 50) == pytest.approx(m)  # clamped after the end
    for s in (20, 35, 60, 95):
        frac = (s - w) / (total - w)
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1 - frac
        assert f(s) == pytest.approx(m + (1 - m) * shape)
    values = [f(s) for s in range(w, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_bad_schedule_names_the_key():
    with pytest.raises(ValueError, match=r"module.lr_scheduler.decay: unknown decay 'cos'; choose from constant, cosine, linear"):
        WarmupDecay(decay="cos")


def _module(**kw):
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,), num_classes=0)
    return DiffusionModule(model=net, diffusion=GaussianDiffusion(num_timesteps=10), sampler=Sampler(steps=2, progress=False), **kw)


def test_annealing_length_comes_from_the_trainer():
    m = _module(lr_scheduler=functools.partial(warmup_decay, warmup_steps=2, decay="cosine", total_steps=None))
    m._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="module.lr_scheduler.decay=cosine .* set module.lr_scheduler.total_steps"):
        m.configure_optimizers()
    m._trainer = SimpleNamespace(estimated_stepping_batches=40)  # from max_epochs x batches / accumulation
    sched = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sched.lr_lambdas[0].total_steps == 40
    # an explicit total_steps is kept
    m = _module(lr_scheduler=functools.partial(warmup_decay, decay="linear", total_steps=7))
    m._trainer = SimpleNamespace(estimated_stepping_batches=40)
    assert m.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0].total_steps == 7


def test_optimizer_and_schedule_are_the_given_targets():
    m = _module(optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9), lr_scheduler=None)
    opt = m.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="module.optimizer.lr must be positive, got -1"):
        _module(optimizer=functools.partial(torch.optim.AdamW, lr=-1))


class _Scaler:
    """GradScaler's device-side scale tensor, as Lightning's 16-mixed plugin holds it."""

    def __init__(self, scales):
        self.scales = list(scales)
        self._scale = None

    def is_enabled(self):
        return True

    def step(self):
        self._scale = torch.tensor([self.scales.pop(0)])


def test_fp16_skipped_steps_are_counted_and_logged():
    """GradScaler halves its scale when it skips a step with non-finite gradients; each halving counts."""
    m = _module()
    logged = []
    m.log = lambda name, value, **kw: logged.append((name, float(value)))
    scaler = _Scaler([65536.0, 65536.0, 32768.0, 32768.0, 16384.0, 32768.0])
    m._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), global_step=0, log_every_n_steps=1)
    for i in range(6):
        scaler.step()
        m.on_train_batch_end(None, None, i)
    assert m.skipped_steps == 2
    assert [v for k, v in logged if k == "train/skipped_steps"] == [0, 0, 1, 1, 2, 2]
    ck = {}
    m.on_save_checkpoint(ck)
    fresh = _module()
    fresh.on_load_checkpoint(ck)
    assert fresh.skipped_steps == 2


def _diverged(tmp_path, clip, precision, ckpt):
    m = _module()
    d = tmp_path / "checkpoints"
    d.mkdir(exist_ok=True)
    if ckpt:
        (d / "last.ckpt").write_bytes(b"x")
    m._trainer = SimpleNamespace(global_step=5, log_every_n_steps=1000, gradient_clip_val=clip, precision=precision,
                                 checkpoint_callbacks=[SimpleNamespace(dirpath=d)], ckpt_path=None)
    m._watch_nonfinite(torch.tensor(float("nan")))  # global step 5 is not a logged step: no sync, no error yet
    with pytest.raises(NonFiniteLossError) as e:
        m.on_save_checkpoint({})
    return str(e.value)


def test_nonfinite_advice_matches_the_run(tmp_path):
    msg = _diverged(tmp_path, clip=None, precision="16-mixed", ckpt=False)
    assert "global step 5" in msg and "trainer.gradient_clip_val" in msg and "trainer.precision=32-true" in msg
    assert "no checkpoint was written" in msg and "ckpt_path" not in msg
    msg = _diverged(tmp_path, clip=1.0, precision="32-true", ckpt=True)
    assert "gradient_clip_val" not in msg and "precision" not in msg
    assert f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}" in msg and "module.optimizer.lr" in msg


def test_a_step_that_is_not_logged_reads_nothing_back_to_the_host(monkeypatch):
    """Host reads of tensor values (``item``, ``bool``, ``float``, ``int``, ``tolist``, ``cpu``, ``numpy``) would
    each synchronise with a GPU; a training step that is not logged makes none, with either timestep sampler."""
    from ddlab.diffusion import LossAwareSampler

    calls = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for sampler in (functools.partial(LossAwareSampler, history=1), None):
        m = _module(**({"timestep_sampler": sampler} if sampler else {}))
        m.log = lambda *a, **k: None
        m._trainer = SimpleNamespace(global_step=3, global_rank=0, world_size=1, log_every_n_steps=10)
        x = torch.randn(4, 1, 8, 8)
        for _ in range(2):  # the second step samples from a warmed-up loss-aware history
            calls.clear()
            m.training_step((x, torch.zeros(4, dtype=torch.long)), 0)
            assert calls == [], calls


def test_time_decay_follows_the_share_of_the_budget_spent():
    f = WarmupDecay(warmup_steps=4, decay="cosine", min_lr_ratio=0.1, decay_over="time")  # no total_steps needed
    assert [f(s) for s in range(3)] == [0.25, 0.5, 0.75]  # warm-up still counts steps
    for frac in (0.0, 0.3, 0.5, 0.9, 1.0, 1.7):
        f.time_fraction = frac
        c = min(frac, 1.0)
        assert f(500) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * c)))
    with pytest.raises(ValueError, match="module.lr_scheduler.decay_over: unknown value 'epochs'"):
        WarmupDecay(decay="linear", decay_over="epochs")
    with pytest.raises(ValueError, match="decay_over=time"):  # the step-based error points to the time-based decay
        WarmupDecay(decay="linear")


def _fit_tiny(max_time, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    m = _module(lr_scheduler=functools.partial(warmup_decay, warmup_steps=0, decay="cosine", min_lr_ratio=0.0, decay_over="time"))
    data = DataLoader(TensorDataset(torch.randn(4096, 1, 8, 8), torch.zeros(4096, dtype=torch.long)), batch_size=4)
    trainer = L.Trainer(max_time=max_time, max_epochs=1 if max_time is None else None, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_train_batches=3 if max_time is None else None, default_root_dir=tmp_path)
    trainer.fit(m, data)
    return trainer


def test_time_decay_reaches_the_bottom_when_the_budget_ends(tmp_path):
    trainer = _fit_tiny({"seconds": 2}, tmp_path)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.lr_lambdas[0].time_fraction > 0.9  # the last step saw almost all of the budget spent
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.05 * sched.base_lrs[0]
    # without a time budget (a debug run with max_epochs / max_steps) it decays over the run's steps
    trainer = _fit_tiny(None, tmp_path)
    fn = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert (fn.decay_over, fn.total_steps) == ("steps", 3) and trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)
