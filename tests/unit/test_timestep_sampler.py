"""Timestep samplers: the loss-aware history against a sequential reference, its weights against the
closed form, and that drawing stays on the generator's device."""

import collections

import pytest
import torch

from ddlab.diffusion import LossAwareSampler, UniformSampler


def _reference_history(T, h, batches):
    """Last ``h`` losses per timestep, recorded one sample at a time in batch order."""
    hist = [collections.deque(maxlen=h) for _ in range(T)]
    for t, loss in batches:
        for ti, li in zip(t.tolist(), loss.tolist()):
            hist[ti].append(li)
    return hist


def test_loss_aware_history_equals_a_sequential_record():
    T, h = 5, 3
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, T, (n,), generator=g), torch.rand(n, generator=g, dtype=torch.float64)) for n in (4, 9, 2, 12, 7)]
    s = LossAwareSampler(T, history=h)
    for t, loss in batches:
        s.update(t, loss)
    ref = _reference_history(T, h, batches)
    for ti in range(T):
        assert int(s.loss_counts[ti]) == len(ref[ti])
        assert s.loss_history[ti, : len(ref[ti])].tolist() == pytest.approx(list(ref[ti]))  # oldest first
    # weights: p_t = (1 - u) sqrt(mean L_t^2) / sum + u / T once every timestep has h losses
    assert bool(s.warmed_up()) == all(len(r) == h for r in ref)
    full = LossAwareSampler(T, history=h, uniform_prob=0.1)
    losses = torch.arange(1, T * h + 1, dtype=torch.float64).reshape(T, h)
    full.update(torch.arange(T).repeat_interleave(h), losses.reshape(-1))
    rms = (losses**2).mean(1).sqrt()
    torch.testing.assert_close(full.weights(), 0.9 * rms / rms.sum() + 0.1 / T)


def test_state_round_trip():
    s = LossAwareSampler(4, history=2)
    s.update(torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    fresh = LossAwareSampler(4, history=2)
    fresh.load_state_dict(s.state_dict())
    fresh.update(torch.tensor([0]), torch.tensor([9.0]))
    assert fresh.loss_history[0].tolist() == [3.0, 9.0]  # 2.0 was the oldest
    fresh.update(torch.tensor([0, 1]), torch.tensor([7.0, 8.0]))
    assert fresh.loss_history[:2].tolist() == [[9.0, 7.0], [4.0, 8.0]]


@pytest.mark.parametrize("cls", [UniformSampler, LossAwareSampler])
def test_draws_are_seeded_and_in_range(cls):
    s = cls(7)
    a, wa = s.sample(64, device="cpu", generator=torch.Generator().manual_seed(3))
    b, wb = s.sample(64, device="cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long and int(a.min()) >= 0 and int(a.max()) < 7
    torch.testing.assert_close(wa, torch.ones(64))  # uniform until warmed up
