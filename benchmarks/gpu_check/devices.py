"""Dense (no sparsity) bf16 tensor peaks of known devices, for model FLOP utilisation (MFU)."""

from __future__ import annotations

from typing import Optional

# (substring of torch.cuda.get_device_name, dense bf16 TFLOP/s) from the vendors' data sheets;
# the first match wins, so specific names come before general ones. --peak-tflops overrides.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),          # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),           # AWS G5; the A10 data sheet's 125 is at a higher clock
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 155.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),          # no bf16: the fp16 tensor peak
    ("T4", 65.0),             # no bf16: the fp16 tensor peak
)


def peak_tflops(name: str, override: Optional[float] = None) -> tuple[Optional[float], str]:
    """(peak TFLOP/s, where it came from) for a device name; (None, reason) when unknown."""
    if override:
        return float(override), "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, f"table ({key})"
    return None, f"unknown device {name!r}: pass --peak-tflops for MFU"
