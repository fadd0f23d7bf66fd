"""ddlab.runtime: validation of the `runtime:` settings, no effect on CPU, the CUDA flags when asked."""

from __future__ import annotations

import pytest
import torch

from ddlab import runtime
from ddlab.models import UNet


@pytest.fixture
def restore_flags():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cuda.flash_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]
    torch.backends.cuda.enable_flash_sdp(saved[2])
    torch.backends.cuda.enable_mem_efficient_sdp(saved[3])
    torch.backends.cuda.enable_math_sdp(saved[4])


@pytest.mark.parametrize("kwargs, match", [
    ({"float32_matmul_precision": "tf32"}, "runtime.float32_matmul_precision.*highest, high, medium"),
    ({"sdpa_backend": "flash2"}, "runtime.sdpa_backend.*auto, flash, efficient, cudnn, math"),
    ({"cudnn_allow_tf32": "yes"}, "runtime.cudnn_allow_tf32 must be true or false"),
    ({"cudnn_benchmark": True}, "unknown option.*cudnn_benchmark.*trainer.benchmark"),
    ({"device": "tpu"}, "device 'tpu'.*auto, cpu, gpu, cuda"),
])
def test_bad_values_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        runtime.apply(**{"device": "cpu", **kwargs})


def test_cpu_run_changes_nothing(restore_flags):
    before = runtime.current()
    out = runtime.apply(float32_matmul_precision="medium", cudnn_allow_tf32=False, sdpa_backend="math", device="cpu")
    assert out["device"] == "cpu" and out["applied"] == {}
    assert set(out["skipped"]) == {"float32_matmul_precision", "cudnn_allow_tf32", "sdpa_backend"}
    assert runtime.current() == before


@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:1", torch.device("cuda", 0)])
def test_cuda_flags_set(restore_flags, device):
    # the flags are process state; setting them needs no GPU
    out = runtime.apply(float32_matmul_precision="medium", cudnn_allow_tf32=False, sdpa_backend="efficient", device=device)
    assert out["device"] == "cuda"
    assert torch.get_float32_matmul_precision() == "medium"
    assert torch.backends.cudnn.allow_tf32 is False
    assert not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()  # the fallback stays on


def test_auto_follows_cuda_availability(restore_flags):
    assert runtime.apply(device="auto")["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_config_node_matches_apply_signature():
    from omegaconf import OmegaConf

    from tests.conftest import CONFIG_DIR

    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "runtime" / "default.yaml"))
    assert runtime.validate(**node) == node  # every key is an argument; the defaults are valid


def test_attention_still_runs_with_a_named_backend(restore_flags):
    # a CPU forward through global attention after a CUDA-style setting: math is the fallback
    runtime.apply(sdpa_backend="flash", device="cuda")
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=[1, 2], blocks=["res", "atn"], num_heads=1)
    out = net(torch.randn(2, 1, 8, 8), torch.tensor([1, 5]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_unet_compile_mode_is_validated():
    with pytest.raises(ValueError, match="model.compile_mode.*reduce-overhead"):
        UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=[1], compile_mode="fast")
