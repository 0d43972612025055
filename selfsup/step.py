"""What one training step shows a method: its views and the training progress.

The ground floor: the engine builds these and every method reads them, so they depend on nothing
else in the package but its neighbour on that floor, selfsup.dist.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from selfsup.dist import PROCESSES, GlobalBatch


@dataclass(frozen=True)
class Progress:
    step: int  # optimizer steps done before this one
    # step / steps_per_epoch and step / total_steps, in [0, 1]: the step's position in the
    # schedules, which a budget's re-plan stretches from its step on (engine/optim.py Schedule)
    epoch: float
    fraction: float


@dataclass
class Views:
    large: list[Tensor]  # global crops, each (N, C, H, W); the first two are "the two views"
    small: list[Tensor] = field(default_factory=list)  # multi-crop local views
    index: Tensor | None = None  # dataset indices (N,), for memory banks
    labels: Tensor | None = None  # class labels (N,): only for methods with uses_labels = True
    # The parts of the global batch this batch is one of: a forward gathers, all-reduces and
    # finds its rank through it (the processes; a step's micro-batches under train.accumulate).
    global_batch: GlobalBatch = PROCESSES
