"""Learning-rate schedules: warm-up, then cosine, linear or constant. Pure functions of the step.

The loop sets the learning rate itself at every optimizer step, so resuming needs only the step
number and the schedule is identical on every worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Schedule:
    """Peak learning rate, warm-up steps, total steps and the decay shape."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based), as Hugging Face's schedulers give it."""
        if step < self.warmup_steps:
            return self.peak_lr * step / max(1, self.warmup_steps)
        if self.kind == "constant":
            return self.peak_lr
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, progress)
        if self.kind == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.peak_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * factor)


def warmup_steps(total_steps: int, ratio: float, steps: int | None) -> int:
    """Exact warm-up steps when given, else ``ceil(ratio * total)`` as Hugging Face computes it."""
    if steps is not None:
        return min(steps, max(0, total_steps - 1))
    return math.ceil(ratio * total_steps)
