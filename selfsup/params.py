"""How a group of parameters is optimised: its own learning rate, weight decay and frozen period.

A method proposes groups by parameter-name prefix (`Method.parameter_groups`, e.g. SimSiam's
predictor at a fixed learning rate); a recipe adds or replaces them under `optim.groups`
(`optim.groups.backbone.lr=0.01`). Every field left at None follows the `optim` section.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    lr: float | None = None  # base learning rate of this group (scaled like optim.lr)
    fixed_lr: bool = False  # hold the peak learning rate: no warm-up, no decay (SimSiam §4.4)
    weight_decay: float | None = None  # decay at the start of training
    final_weight_decay: float | None = None  # cosine from weight_decay to this (DINO: 0.04 → 0.4)
    frozen_epochs: float = 0.0  # no update at all for this many epochs (SwAV's prototypes)

    def __post_init__(self) -> None:
        bad = [
            f"{name}={value} (need >= 0)"
            for name, value in vars(self).items()
            if isinstance(value, float) and value < 0
        ]
        if bad:
            raise ValueError(f"invalid parameter group: {', '.join(bad)}")


def require_positive(**values: float) -> None:
    """A method's size and temperature parameters, checked where the method is built."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"'method.{name}' must be > 0, got {value!r}")
