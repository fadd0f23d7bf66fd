"""Scaling section of ``benchmarks.run``: time per training step as batch and image size grow; on CUDA
also channels_last, bf16, ``torch.compile`` and the SDPA attention backends."""

from __future__ import annotations

import torch

from benchmarks.common import fmt, preset_names, stats, table
from benchmarks.common import progress as _progress
from benchmarks.train import DEFAULT_MODEL, Case, run_bare, throughput


def bench_scaling(s: dict, dev: torch.device, notes: list) -> list[dict]:
    rows = []

    def measure(axis, variant, size, batch, extra=(), preset=DEFAULT_MODEL, **kw):
        try:
            case = Case(preset, size, batch, dev, s["base_channels"], extra=tuple(extra))
            per = []
            for _ in range(s["repeats"]):
                per += throughput(run_bare(case, s["warmup"], s["steps"], **kw), s["warmup"], batch)[1]
        except Exception as e:  # noqa: BLE001  (reported in the notes, not fatal)
            notes.append(f"scaling {axis} {variant} {size}px b{batch}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return None
        st = stats(1000 * v for v in per)
        row = {"axis": axis, "variant": variant, "preset": preset, "image_size": size, "batch_size": batch,
               "precision": case.precision, "step_ms": st, "ms_per_image": st["median"] / batch}
        rows.append(row)
        return row

    _progress("scaling: batch size")
    for b in s["scale_batches"]:
        measure("batch", "default", 32 if not s.get("quick") else s["sizes"][0], b)
    _progress("scaling: image size")
    for size in s["scale_sizes"]:
        measure("image_size", "default", size, s["scale_batch"])
    if dev.type == "cuda":
        _progress("scaling: GPU variants")
        size, b = 64, s["scale_batch"]
        measure("gpu", "fp32", size, b, extra=("trainer.precision=32-true",))
        measure("gpu", "bf16-mixed", size, b, extra=("trainer.precision=bf16-mixed",))
        measure("gpu", "channels_last+bf16", size, b, extra=("trainer.precision=bf16-mixed",), channels_last=True)
        measure("gpu", "torch.compile+bf16", size, b, extra=("trainer.precision=bf16-mixed",), compile_model=True)
        attn = [p for p in preset_names() if "atn" in p or "adm" in p]
        if attn:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for label, backends in (("sdpa-math", [SDPBackend.MATH]),
                                    ("sdpa-fused", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])):
                with sdpa_kernel(backends):
                    measure("gpu", f"{label} ({attn[0]})", size, b, extra=("trainer.precision=bf16-mixed",), preset=attn[0])
        else:
            notes.append("scaling: no attention preset (atn/adm) in configs/model; SDPA variants skipped")
    return rows


def markdown(rows: list[dict]) -> list[str]:
    return table("**Scaling** (time per training step, bare loop doing ddlab's work, default model)",
                 ["axis", "variant", "px", "batch", "step ms", "ms / image"],
                 [[r["axis"], r["variant"], r["image_size"], r["batch_size"], fmt(r["step_ms"]), f"{r['ms_per_image']:.2f}"] for r in rows])
