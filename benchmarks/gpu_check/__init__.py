"""``python -m benchmarks.gpu_check``: the CUDA path in one call (``make bench-gpu``).

On one CUDA device, within a hard time budget it enforces itself, the check runs four sections
and writes ``benchmarks/results/gpu-<device>-<date>.json`` plus a markdown table:

- ``e2e`` (:mod:`.e2e`): ``ddlab.train`` / ``ddlab.sample`` / ``ddlab.fid`` as subprocesses (bf16 and
  fp16 runs, resume, the grad scaler's skipped steps, domain FID);
- ``throughput`` (:mod:`.throughput`): the Lightning step against a bare PyTorch loop, per precision,
  memory format and ``torch.compile``, with peak memory and model FLOP utilisation;
- ``sampling`` (:mod:`.sampling`): DDIM-50 and DPM-Solver++(2M)-10, guided ``joint`` and ``split``,
  against diffusers' schedulers around the same network;
- ``ddp`` (:mod:`.e2e`): ``trainer=ddp`` over NCCL (gloo on CPU) trains and checkpoints.

``--device cpu --quick`` runs the same code at toy sizes in under a minute (the test suite runs it),
so the script cannot rot between GPU loans.
"""
