"""Optimizers (SGD, AdamW, LARS) and parameter groups with their own schedules.

Every group of parameters (selfsup/params.py: chosen by the method and the recipe, by parameter-
name prefix) gets its own learning rate or a fixed one, its weight decay and weight-decay
schedule, and a frozen period. `Schedule.apply(step)` sets each group's learning rate and weight
decay before a step; `Schedule.drop_frozen_gradients(step)` runs between backward and the
optimizer step, so a frozen group moves neither by gradient, momentum nor decay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from selfsup.config import OptimConfig, check_choice
from selfsup.methods.base import Method
from selfsup.params import Group
from selfsup.schedules import cosine, linear_warmup, warmup_cosine

DEFAULT_GROUP = ""  # the prefix of every parameter that no other group claims


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, arXiv 1708.03888).

    For a group with `lars=True`, the update of each parameter is scaled by the trust ratio
    eta·||w|| / ||g + wd·w||, so its step is lr·eta·||w|| / ||g + wd·w||. With `clip` (the clip
    mode of NVIDIA apex's LARC, which solo-learn's CIFAR recipes use: `clip_lr: True`) the trust
    ratio is divided by lr and capped at 1, so the step is min(eta·||w|| / ||g + wd·w||, lr):
    each layer moves at its own rate eta·||w||/||u|| unless that exceeds the schedule's lr.
    Groups of norms and biases set lars=False and weight_decay=0, as SimCLR and BYOL do.
    """

    def __init__(
        self,
        params,  # noqa: ANN001
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        clip: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True, clip=clip
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0
                    )
                    if group["clip"] and group["lr"] > 0:
                        trust = (trust / group["lr"]).clamp(max=1.0)
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def resolve_groups(method: Method, config: OptimConfig) -> dict[str, Group]:
    """The method's groups, then the recipe's (replacing those of the same prefix), checked."""
    groups = {DEFAULT_GROUP: Group(), **method.parameter_groups(), **config.groups}
    names = [name for name, p in method.named_parameters() if p.requires_grad]
    for prefix in groups:
        if prefix and not any(_belongs(name, prefix) for name in names):
            children = ", ".join(name for name, _ in method.named_children())
            raise ValueError(
                f"optim.groups: '{prefix}' names no trainable parameter of method "
                f"'{type(method).__name__}'; name a module, e.g. one of: {children}"
            )
    return groups


def _belongs(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(f"{prefix}.")


def group_of(name: str, prefixes: list[str]) -> str:
    """The longest prefix that `name` belongs to ('' when none does)."""
    return max((p for p in prefixes if p and _belongs(name, p)), key=len, default=DEFAULT_GROUP)


def parameter_groups(method: Method, config: OptimConfig) -> list[dict]:
    """Torch parameter groups: one per (group, norm-or-bias) pair that has parameters.

    Norms and biases (ndim <= 1) get no weight decay and no LARS adaptation unless
    `decay_norms_and_biases`. Each group carries its schedule: peak_lr, fixed_lr,
    weight_decay at start and end, and frozen_epochs.
    """
    groups = resolve_groups(method, config)
    prefixes = list(groups)
    members: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in method.named_parameters():
        if p.requires_grad:
            exempt = p.ndim <= 1 and not config.decay_norms_and_biases
            members.setdefault((group_of(name, prefixes), exempt), []).append(p)
    out = []
    for (prefix, exempt), params in sorted(members.items()):
        group = groups[prefix]
        decay = config.weight_decay if group.weight_decay is None else group.weight_decay
        final = group.final_weight_decay
        if final is None:
            final = decay if config.final_weight_decay is None else config.final_weight_decay
        out.append(
            {
                "params": params,
                "name": prefix or "default",
                "peak_lr": peak_lr(config, group.lr),
                "fixed_lr": group.fixed_lr,
                "weight_decay": 0.0 if exempt else decay,
                "final_weight_decay": 0.0 if exempt else final,
                "initial_weight_decay": 0.0 if exempt else decay,
                "frozen_epochs": group.frozen_epochs,
                "lars": not exempt,
            }
        )
    return out


def peak_lr(config: OptimConfig, lr: float | None = None) -> float:
    scale = config.batch_size / 256 if config.lr_scaling == "linear" else 1.0
    return (config.lr if lr is None else lr) * scale


def build_optimizer(method: Method, config: OptimConfig) -> torch.optim.Optimizer:
    check_choice("optim.lr_scaling", config.lr_scaling)
    check_choice("optim.name", config.name)
    groups = parameter_groups(method, config)
    lr = peak_lr(config)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=config.betas)
    if config.name == "lars":
        return LARS(
            groups, lr=lr, momentum=config.momentum, eta=config.lars_eta, clip=config.lars_clip
        )
    raise AssertionError(f"optim.name '{config.name}' is in CHOICES but has no optimiser here")


class Schedule:
    """Learning rate, weight decay and frozen periods of every group at each step.

    `total_steps` is the length the schedules are planned over. A budget's re-plan (`stretch`,
    train.replan) runs the schedules' rest from step k over a different number of steps: step
    s >= k is at position k + (s - k)(total - k)/(steps - k) of the planned schedules, so every
    step before k is exactly the planned one and the last step ends them (engine/budget.py).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: OptimConfig,
        steps_per_epoch: int,
        total_steps: int,
        stretch: tuple[int, int] | None = None,
    ) -> None:
        check_choice("optim.schedule", config.schedule)
        self.optimizer, self.config = optimizer, config
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.stretch(*(stretch or (total_steps, total_steps)))

    def stretch(self, at_step: int, steps: int) -> None:
        """From `at_step` on, run the rest of the planned schedules over `steps` - `at_step`
        steps: the run is `steps` long."""
        if not (0 < at_step < min(steps, self.total_steps) or at_step == steps == self.total_steps):
            raise ValueError(
                f"train.replan must be [step, steps] with 0 < step < steps and step < the "
                f"{self.total_steps} planned steps, got [{at_step}, {steps}]"
            )
        self.at_step, self.steps = at_step, steps

    def position(self, step: int) -> float:
        """Where step `step` is in the planned schedules (in planned steps)."""
        if step < self.at_step or self.steps == self.at_step:  # planned, or no re-plan
            return step
        k = self.at_step
        return k + (step - k) * (self.total_steps - k) / (self.steps - k)

    def learning_rate(self, step: int, peak: float | None = None) -> float:
        """Linear warm-up over warmup_epochs, then cosine or linear decay to final_lr (or
        constant)."""
        peak = peak_lr(self.config) if peak is None else peak
        warmup_steps = round(self.config.warmup_epochs * self.steps_per_epoch)
        schedule = self.config.schedule
        total = self.total_steps if schedule != "constant" else 10**18
        decay = linear_warmup if schedule == "linear" else cosine
        at = self.position(step)
        return warmup_cosine(peak, at, total, warmup_steps, self.config.final_lr, decay)

    def apply(self, step: int) -> None:
        """Set each group's learning rate and weight decay for the step `step` (0-based)."""
        for group in self.optimizer.param_groups:
            peak = group["peak_lr"]
            group["lr"] = peak if group["fixed_lr"] else self.learning_rate(step, peak)
            group["weight_decay"] = cosine(
                group["initial_weight_decay"],
                group["final_weight_decay"],
                self.position(step) / max(self.total_steps, 1),
            )

    def frozen(self, group: dict, step: int) -> bool:
        # .inf: frozen throughout
        return self.position(step) < group["frozen_epochs"] * self.steps_per_epoch

    def drop_frozen_gradients(self, step: int) -> None:
        """Between backward and the optimizer step: frozen groups lose their gradients, so the
        optimizer skips them (no momentum, no weight decay), as SwAV's and DINO's code do."""
        for group in self.optimizer.param_groups:
            if self.frozen(group, step):
                for p in group["params"]:
                    p.grad = None
