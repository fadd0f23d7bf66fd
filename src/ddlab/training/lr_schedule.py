"""Learning-rate schedule: linear warm-up, then constant, cosine or linear decay over the run's
steps or, for time-budgeted runs (``trainer.max_time``), over its training time.

``module.lr_scheduler`` in ``configs/train.yaml`` is a ``_partial_`` target of :func:`warmup_decay`;
:class:`DiffusionModule` calls it with the optimizer (and fills ``total_steps`` from the trainer
when the config leaves it null). Any other ``torch.optim.lr_scheduler`` class taking the optimizer
as first argument works the same way, e.g.
``module.lr_scheduler._target_=torch.optim.lr_scheduler.StepLR +module.lr_scheduler.step_size=1000 ~module.lr_scheduler.warmup_steps ...``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

DECAYS = ("constant", "cosine", "linear")
DECAY_OVER = ("steps", "time")


class WarmupDecay:
    """Multiplier of the base LR at optimizer step ``s`` (a picklable ``lr_lambda`` for ``LambdaLR``).

    ``(s + 1) / warmup_steps`` during warm-up; afterwards 1 (``constant``), or a cosine / linear
    decay from 1 to ``min_lr_ratio`` at ``total_steps``, held there after the end.

    ``decay_over="time"`` decays over the fraction of the time budget spent instead of the steps:
    the decay is at ``time_fraction`` (0 at the start of training, 1 at ``trainer.max_time``), which
    :class:`~ddlab.training.DiffusionModule` sets from Lightning's ``Timer`` before every step (the
    timer's elapsed time is in the checkpoint, so a resumed run continues the curve). The run then
    ends at the bottom of the schedule however many steps the machine managed. Without
    ``trainer.max_time`` the module switches it to ``steps`` over the trainer's step count.
    """

    def __init__(self, warmup_steps: int = 0, decay: str = "constant", total_steps: Optional[int] = None,
                 min_lr_ratio: float = 0.0, decay_over: str = "steps"):
        if int(warmup_steps) < 0:
            raise ValueError(f"module.lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
        if decay not in DECAYS:
            raise ValueError(f"module.lr_scheduler.decay: unknown decay {decay!r}; choose from {', '.join(DECAYS)}")
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"module.lr_scheduler.min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        if decay_over not in DECAY_OVER:
            raise ValueError(f"module.lr_scheduler.decay_over: unknown value {decay_over!r}; choose from {', '.join(DECAY_OVER)}")
        if decay != "constant" and decay_over == "steps" and not total_steps:
            raise ValueError(
                f"module.lr_scheduler.decay={decay} anneals to module.lr_scheduler.min_lr_ratio at the last step, which is "
                "unknown: set module.lr_scheduler.total_steps (or trainer.max_steps / trainer.max_epochs), or use "
                "module.lr_scheduler.decay_over=time to decay over trainer.max_time"
            )
        self.warmup_steps, self.decay, self.decay_over = int(warmup_steps), decay, decay_over
        self.time_fraction = 0.0  # decay_over=time: the share of trainer.max_time spent (set by the module)
        self.total_steps, self.min_lr_ratio = total_steps, float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        if self.decay_over == "time":
            frac = min(1.0, max(0.0, float(self.time_fraction)))
        elif self.total_steps <= self.warmup_steps:
            return 1.0
        else:
            frac = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if self.decay == "cosine" else 1.0 - frac
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 0,
    decay: str = "constant",
    total_steps: Optional[int] = None,
    min_lr_ratio: float = 0.0,
    decay_over: str = "steps",
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :class:`WarmupDecay`, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(warmup_steps, decay, total_steps, min_lr_ratio, decay_over))
