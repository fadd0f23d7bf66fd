"""Preemption: a signal (SIGTERM, SLURM's SIGUSR1) stops training at the next optimizer step with a
checkpoint, and the process exits 0; under SLURM the job can requeue itself.

The signal handler only sets a flag. At the end of each optimizer step every rank votes (one tiny
all-reduce: any rank that got the signal stops all of them), the step's state is saved to
``last.ckpt`` (after the EMA update, as a scheduled checkpoint is) and Lightning is asked to stop, so
the checkpoint is a consistent step boundary, never the middle of a step or of gradient
accumulation. Lightning's own SIGTERM and SLURM handlers are replaced while training runs: they save
from inside the signal handler (at an arbitrary point of a step) or exit without a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def parse_signals(names: Sequence[str | int]) -> list[signal.Signals]:
    out = []
    for n in names:
        try:
            out.append(signal.Signals[n] if isinstance(n, str) else signal.Signals(n))
        except (KeyError, ValueError):
            valid = ", ".join(s.name for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT))
            raise ValueError(f"preemption.signals: unknown signal {n!r}; choose from {valid}") from None
    return out


class Preemption(Callback):
    """Stop with a checkpoint on ``signals``. ``dirpath``: where ``last.ckpt`` goes (the run's
    checkpoint folder). ``requeue``: after a SIGUSR1 under SLURM (``SLURM_JOB_ID`` set), rank 0 runs
    ``scontrol requeue <job>`` once the checkpoint is written."""

    def __init__(self, dirpath: str, signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.dirpath = Path(dirpath)
        self.signals = parse_signals(signals)
        self.requeue = bool(requeue)
        self.received: Optional[int] = None
        self.stopped_at: Optional[int] = None
        self._previous: dict = {}
        self._last_step = -1

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: not on the main thread, signals are not handled")
            return
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step this batch (gradient accumulation)
            return
        self._last_step = step
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.save(trainer)
        self.stopped_at = step
        trainer.should_stop = True

    def save(self, trainer: pl.Trainer) -> Path:
        from ddlab.training.callbacks import StepCheckpoint

        steps = [c for c in trainer.callbacks if isinstance(c, StepCheckpoint)]
        if steps:  # its bookkeeping (last step saved) stays right, and it writes last.ckpt
            steps[0]._save(trainer, last_only=True)
            path = steps[0].dirpath / "last.ckpt"
        else:
            path = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(path)
        log.warning("preemption: signal %s received; checkpoint at step %d written to %s", self.received, trainer.global_step, path)
        return path

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def maybe_requeue(self, is_global_zero: bool) -> bool:
        """``scontrol requeue`` the SLURM job after a SIGUSR1 stop (rank 0 only). Returns whether it ran."""
        job = os.environ.get("SLURM_JOB_ID")
        if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        if not (self.requeue and is_global_zero and job and self.received == signal.SIGUSR1 and self.stopped_at is not None):
            return False
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        if r.returncode:
            log.error("preemption: `scontrol requeue %s` failed (%s); resubmit the job by hand", job, r.stderr.strip())
            return False
        log.warning("preemption: requeued SLURM job %s; it continues from its last.ckpt (ckpt_path=auto)", job)
        return True
