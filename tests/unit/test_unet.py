"""U-Net construction, shapes, gradients, conditioning and clear errors."""

import math

import pytest
import torch

from ddlab.models import UNet, timestep_embedding


def tiny(**kw):
    args = dict(image_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2), blocks=["res"], num_classes=10)
    args.update(kw)
    return UNet(**args)


@pytest.mark.parametrize("size,mult", [(28, (1, 2, 2)), (32, (1, 2, 2)), (64, (1, 2, 2, 2)), (16, (1,))])
def test_shapes_and_gradients(size, mult):
    m = tiny(image_size=size, channel_mult=mult, out_channels=2)
    x = torch.randn(2, 1, size, size)
    out = m(x, torch.tensor([0, 999]), torch.tensor([3, 10]))
    assert out.shape == (2, 2, size, size)
    # zero-initialised output conv: first output is exactly 0; gradients reach every parameter
    out = m.out[-1]
    torch.nn.init.normal_(out.weight, std=0.02)
    m(x, torch.tensor([0, 5]), torch.tensor([1, 2])).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


def test_impossible_size_names_key():
    with pytest.raises(ValueError, match="channel_mult"):
        tiny(image_size=28, channel_mult=(1, 2, 2, 2))


def test_unknown_block_names_choices():
    with pytest.raises(ValueError, match="model.blocks: unknown block 'atten'"):
        tiny(blocks=["res", "atten"])


def test_class_label_changes_output():
    torch.manual_seed(0)
    m = tiny()
    for p in m.parameters():  # leave zero-init behind so the output depends on the input
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 1, 16, 16)
    t = torch.tensor([100])
    a, b, null = m(x, t, torch.tensor([1])), m(x, t, torch.tensor([2])), m(x, t, None)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(null, m(x, t, torch.tensor([10])))


def test_labels_on_unconditional_model_fail():
    m = tiny(num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_timestep_embedding_range_and_frequencies():
    t = torch.arange(0, 1000)
    e = timestep_embedding(t, 64)
    assert e.shape == (1000, 64) and e.abs().max() <= 1.0
    # the first frequency is 1 (cos(t)), the last 1/10000: the slowest channel barely moves
    torch.testing.assert_close(e[:, 0], torch.cos(t.float()))
    torch.testing.assert_close(e[:, 31], torch.cos(t.float() / 10000.0))
    # smooth in t: neighbouring timesteps are close, distant ones far
    d1 = (e[1:] - e[:-1]).norm(dim=1)
    assert d1.max() < math.sqrt(64) and (e[0] - e[500]).norm() > d1.mean()
