"""The time budget: each section gets a share of the total and is cut, with a note, when it runs over."""

from __future__ import annotations

import time
from typing import Optional


class OverBudget(Exception):
    """Raised by :meth:`Section.check` once the section's share of the budget is spent."""


class Section:
    """A section's deadline. ``check(what)`` between sub-steps raises :class:`OverBudget`;
    ``left()`` bounds subprocess timeouts and timed loops."""

    def __init__(self, name: str, seconds: float, hard_end: Optional[float] = None):
        self.name, self.seconds = name, float(seconds)
        self.start = time.monotonic()
        end = self.start + self.seconds
        self.deadline = min(end, hard_end) if hard_end is not None else end
        self.notes: list[str] = []

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self, what: str) -> None:
        if time.monotonic() >= self.deadline:
            raise OverBudget(f"{self.name}: cut at '{what}' after {self.elapsed():.0f} s (share {self.seconds:.0f} s)")

    def note(self, text: str) -> None:
        self.notes.append(text)


class Budget:
    """A total of ``seconds`` split into named shares (fractions); the hard end is never passed.

    A section that finishes early leaves its time to the later ones: each share is taken of the time
    still left, weighted by the shares still to run."""

    def __init__(self, seconds: float, shares: dict[str, float]):
        self.seconds = float(seconds)
        self.start = time.monotonic()
        self.end = self.start + self.seconds
        self.shares = dict(shares)

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def section(self, name: str) -> Section:
        names = list(self.shares)
        rest = sum(self.shares[n] for n in names[names.index(name):])
        return Section(name, self.left() * self.shares[name] / rest, hard_end=self.end)
