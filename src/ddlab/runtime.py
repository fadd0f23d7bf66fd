"""Process-wide GPU settings from the ``runtime:`` config node (``configs/runtime/default.yaml``).

Entry points call :func:`apply` once, before building the model. The settings are CUDA kernel
choices; on a CPU run :func:`apply` changes nothing (so the CPU numerics of the tests and the
CPU recipe are untouched) and reports the settings as skipped.

Settings that have a home elsewhere are not repeated here: cuDNN autotuning is Lightning's
``trainer.benchmark`` (on in ``trainer=gpu``); channels-last and ``torch.compile`` are the network's
``model.channels_last``, ``model.compile`` and ``model.compile_mode`` (:class:`ddlab.models.UNet`).
"""

from __future__ import annotations

from typing import Any, Union

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
DEVICES = ("auto", "cpu", "gpu", "cuda")


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"runtime.{key} must be true or false, got {value!r}")
    return value


def _is_cuda(device: Union[str, torch.device, None]) -> bool:
    """Whether ``device`` (a torch device, ``cuda:N``, or a Lightning accelerator name) means CUDA."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    name = "auto" if device is None else str(device)
    base = name.split(":", 1)[0]
    if base not in DEVICES:
        raise ValueError(f"runtime device {name!r} is not known; choose from {', '.join(DEVICES)} (or cuda:N)")
    if base == "auto":
        return torch.cuda.is_available()
    return base in ("gpu", "cuda")


def validate(float32_matmul_precision: str = "high", cudnn_allow_tf32: bool = True, sdpa_backend: str = "auto",
             **unknown: Any) -> dict:
    """Check the settings (see :func:`apply`) and return them as a dict; clear errors name the key."""
    if unknown:
        valid = "float32_matmul_precision, cudnn_allow_tf32, sdpa_backend"
        hint = " (cuDNN autotuning is Lightning's trainer.benchmark)" if "cudnn_benchmark" in unknown else ""
        raise ValueError(f"runtime: unknown option(s) {', '.join(sorted(unknown))}; valid options: {valid}{hint}")
    if float32_matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"runtime.float32_matmul_precision: unknown value {float32_matmul_precision!r}; "
                         f"choose from {', '.join(MATMUL_PRECISIONS)} (high = TF32 matmuls on Ampere and newer)")
    if sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"runtime.sdpa_backend: unknown backend {sdpa_backend!r}; choose from {', '.join(SDPA_BACKENDS)}")
    return {
        "float32_matmul_precision": float32_matmul_precision,
        "cudnn_allow_tf32": _check_bool("cudnn_allow_tf32", cudnn_allow_tf32),
        "sdpa_backend": sdpa_backend,
    }


def _set_sdpa(backend: str) -> None:
    """``auto``: every fused kernel enabled and torch picks per call. A named kernel is the only fused
    one left enabled; the math kernel always stays on as the fallback for inputs the kernel cannot take
    (e.g. flash attention takes no float32 inputs), so no setting here can make attention fail."""
    on = {b: backend in ("auto", b) for b in ("flash", "efficient", "cudnn")}
    torch.backends.cuda.enable_flash_sdp(on["flash"])
    torch.backends.cuda.enable_mem_efficient_sdp(on["efficient"])
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(on["cudnn"])
    torch.backends.cuda.enable_math_sdp(True)


def apply(float32_matmul_precision: str = "high", cudnn_allow_tf32: bool = True, sdpa_backend: str = "auto",
          device: Union[str, torch.device, None] = "auto", **unknown: Any) -> dict:
    """Validate and apply the process-wide GPU settings; returns a record of what was done.

    Args:
        float32_matmul_precision: ``torch.set_float32_matmul_precision``: ``highest`` (full float32),
            ``high`` (TF32 tensor cores on Ampere and newer: about 10 mantissa bits for float32
            matmuls, several times faster), ``medium`` (bfloat16 internally).
        cudnn_allow_tf32: ``torch.backends.cudnn.allow_tf32``: TF32 in float32 convolutions.
        sdpa_backend: ``auto`` | ``flash`` | ``efficient`` | ``cudnn`` | ``math``: the fused
            ``scaled_dot_product_attention`` kernel (see :func:`_set_sdpa`).
        device: where the run computes: ``auto`` (CUDA when available), ``cpu``, ``gpu``/``cuda``/
            ``cuda:N`` (Lightning accelerator names work) or a ``torch.device``. Off CUDA nothing is
            changed.

    Returns ``{"device": "cuda"|"cpu", "applied": {...}, "skipped": [...]}``.
    """
    settings = validate(float32_matmul_precision, cudnn_allow_tf32, sdpa_backend, **unknown)
    if not _is_cuda(device):
        return {"device": "cpu", "applied": {}, "skipped": sorted(settings)}
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    torch.backends.cudnn.allow_tf32 = settings["cudnn_allow_tf32"]
    _set_sdpa(settings["sdpa_backend"])
    return {"device": "cuda", "applied": settings, "skipped": []}


def current() -> dict:
    """The settings in force now (for reports)."""
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
        "sdpa_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "sdpa_math": torch.backends.cuda.math_sdp_enabled(),
    }
