"""Optimizers (SGD, AdamW, LARS), parameter groups and the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from selfsup.config import OptimConfig
from selfsup.methods.base import Method
from selfsup.schedules import warmup_cosine


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, arXiv 1708.03888).

    For a group with `lars=True`, the update of each parameter is scaled by the trust ratio
    eta·||w|| / ||g + wd·w||. Groups of norms and biases set lars=False and weight_decay=0, as
    SimCLR and BYOL do.
    """

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3
    ) -> None:  # noqa: ANN001
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True)
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
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def parameter_groups(method: Method, weight_decay: float) -> list[dict]:
    """No weight decay (and no LARS adaptation) on norms and biases: parameters with ndim <= 1.

    Parameters the method trains at a fixed learning rate go in groups with fixed_lr=True.
    """
    fixed = {id(p) for p in method.fixed_lr_parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in method.parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim <= 1, id(p) in fixed), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if is_norm_or_bias else weight_decay,
            "lars": not is_norm_or_bias,
            "fixed_lr": is_fixed,
        }
        for (is_norm_or_bias, is_fixed), params in sorted(groups.items())
    ]


def peak_lr(config: OptimConfig) -> float:
    scale = config.batch_size / 256 if config.lr_scaling == "linear" else 1.0
    return config.lr * scale


def build_optimizer(method: Method, config: OptimConfig) -> torch.optim.Optimizer:
    if config.lr_scaling not in ("linear", "none"):
        raise ValueError(f"optim.lr_scaling must be 'linear' or 'none', got '{config.lr_scaling}'")
    groups = parameter_groups(method, config.weight_decay)
    lr = peak_lr(config)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=config.betas)
    if config.name == "lars":
        return LARS(groups, lr=lr, momentum=config.momentum, eta=config.lars_eta)
    raise ValueError(f"unknown optimizer '{config.name}'; valid: sgd, adamw, lars")


def learning_rate(config: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Linear warm-up over warmup_epochs, then cosine decay to final_lr (or constant)."""
    if config.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got '{config.schedule}'")
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "constant":
        total_steps = 10**18  # the cosine never moves
    return warmup_cosine(peak_lr(config), step, total_steps, warmup_steps, config.final_lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr if group.get("fixed_lr") else lr
