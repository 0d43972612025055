"""Parameters: the allowed values of numeric ones, and how a group of them is optimised.

Limits: one table by name for the parameters of methods, backbones and views (the same name
means the same thing everywhere), checked both when a config is read (config.py, the section in
the message) and where a method is built (`check_method`: the Python API passes no config).

Groups: a method proposes groups by parameter-name prefix (`Method.parameter_groups`, e.g.
SimSiam's predictor at a fixed learning rate); a recipe adds or replaces them under
`optim.groups` (`optim.groups.backbone.lr=0.01`). Every field left at None follows the `optim`
section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Limit = tuple[Callable[[Any], bool], str]  # (does a value pass, the allowed values in words)
POSITIVE: Limit = (lambda v: v > 0, "> 0")
# a length of training: infinity would be a run that never ends (and no step count)
FINITE_POSITIVE: Limit = (lambda v: 0 < v < float("inf"), "> 0 and finite")
NON_NEGATIVE: Limit = (lambda v: v >= 0, ">= 0")
AT_LEAST_ONE: Limit = (lambda v: v >= 1, ">= 1")
UNIT: Limit = (lambda v: 0 <= v <= 1, "in [0, 1]")
BELOW_ONE: Limit = (lambda v: 0 <= v < 1, "in [0, 1)")
# a share of a data set: train.label_fraction, data.fraction
FRACTION: Limit = (lambda v: 0 < v <= 1, "in (0, 1]")

# Allowed values of the parameters of methods, backbones and views, by name: a bad value fails
# when the config is read, not mid-run (a temperature of 0 would train into NaN, a negative one
# "succeed" at nothing). Where one method needs more of a shared name (MoCo's queue_size >= 1,
# while 0 switches SimCLR's and SwAV's queue off) it says so where it checks, with its own limit.
PARAMETER_LIMITS: dict[str, Limit] = {
    **dict.fromkeys(
        ("temperature", "teacher_temp", "final_teacher_temp", "student_temp", "epsilon", "eps",
         "width", "std_target", "patch_stride", "size", "image_size", "small_size", "balance",
         "loss_scale"),
        POSITIVE,
    ),
    **dict.fromkeys(
        ("dim", "hidden", "out_dim", "bottleneck", "predictor_hidden", "context_hidden",
         "num_prototypes", "sinkhorn_iterations", "patch_size", "prediction_steps",
         "context_blocks", "projector_layers", "head_layers", "num_views", "in_channels",
         "num_noise", "num_negatives"),
        AT_LEAST_ONE,
    ),
    **dict.fromkeys(
        ("queue_size", "bank_negatives", "num_small", "queue_start_epoch", "layers",
         "freeze_last_layer_epochs", "freeze_prototypes_epochs", "teacher_temp_warmup_epochs",
         "proximal", "from_projector", "invariance_weight", "variance_weight",
         "covariance_weight", "off_diagonal_weight", "sk_ratio", "strength"),
        NON_NEGATIVE,
    ),
    **dict.fromkeys(
        ("momentum", "final_momentum", "center_momentum", "label_smoothing", "drop_path",
         "blur_p", "flip_p", "grayscale_p", "jitter_p", "small_blur_p", "solarize_p"),
        UNIT,
    ),
    # a memory bank's entry and UniGrad's F must keep some of the new batch (negatives.py)
    **dict.fromkeys(("bank_momentum", "correlation_momentum"), BELOW_ONE),
}  # fmt: skip


def check_limits(
    section: str, values: Mapping[str, Any], limits: Mapping[str, Limit] = PARAMETER_LIMITS
) -> None:
    """Raise for the first value outside the limit of its name: "'section.name' must be > 0, got
    0". Only numbers are checked (a tuple: each item); None and names without a limit pass."""
    for name, value in values.items():
        if name not in limits:
            continue
        ok, allowed = limits[name]
        items = value if isinstance(value, tuple) else (value,)
        numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not all(map(ok, numbers)):
            raise ValueError(f"'{section}.{name}' must be {allowed}, got {value!r}")


def check_method(**values: Any) -> None:
    """A method's parameters against `PARAMETER_LIMITS`, where the method is built."""
    check_limits("method", values)


# A parameter group's settings; optim's of the same names (config.py) are held to the same limits.
GROUP_LIMITS: dict[str, Limit] = dict.fromkeys(
    ("lr", "weight_decay", "final_weight_decay", "frozen_epochs"), NON_NEGATIVE
)


@dataclass(frozen=True)
class Group:
    lr: float | None = None  # base learning rate of this group (scaled like optim.lr)
    fixed_lr: bool = False  # hold the peak learning rate: no warm-up, no decay (SimSiam §4.4)
    weight_decay: float | None = None  # decay at the start of training
    final_weight_decay: float | None = None  # cosine from weight_decay to this (DINO: 0.04 → 0.4)
    frozen_epochs: float = 0.0  # no update at all for this many epochs (SwAV's prototypes)

    def __post_init__(self) -> None:
        bad = [
            f"{name}={value} (need {allowed})"
            for name, (ok, allowed) in GROUP_LIMITS.items()
            if (value := getattr(self, name)) is not None and not ok(value)
        ]
        if bad:
            raise ValueError(f"invalid parameter group: {', '.join(bad)}")
