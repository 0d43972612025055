"""Schedules as pure functions of training progress (a fraction in [0, 1] or epochs)."""

from __future__ import annotations

import math
from collections.abc import Callable


def cosine(start: float, end: float, fraction: float) -> float:
    """Half-cosine from `start` (fraction 0) to `end` (fraction 1); clamped outside [0, 1]."""
    fraction = min(max(fraction, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def cosine_ramp(start: float, end: float, fraction: float) -> float:
    """BYOL's momentum ramp: 1 - (1 - start)(cos(pi f) + 1)/2, i.e. start -> end on a cosine."""
    return cosine(start, end, fraction)


def linear_warmup(start: float, end: float, fraction: float) -> float:
    """Linear from `start` to `end` over fraction [0, 1], then constant at `end`."""
    fraction = min(max(fraction, 0.0), 1.0)
    return start + (end - start) * fraction


def warmup_cosine(
    base: float,
    step: float,
    total_steps: int,
    warmup_steps: int,
    final: float = 0.0,
    decay: Callable[[float, float, float], float] = cosine,
) -> float:
    """Linear warm-up from ~0 to `base` over `warmup_steps`, then `decay` (cosine, or
    linear_warmup for a straight line) from `base` to `final` over the remaining steps."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    return decay(base, final, (step - warmup_steps) / decay_steps)
