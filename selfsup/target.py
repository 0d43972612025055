"""The momentum (EMA) target branch, and the switch that turns it into a stop-gradient copy.

`EMA(*online)` registers frozen deep copies of the online modules (MoCo's key encoder, BYOL's
target network, DINO's teacher) and runs them in sequence; `update(m)` moves them towards the
online weights, θ_t ← m·θ_t + (1 − m)·θ_o. The online modules are held by reference in a plain
tuple, not registered, so their weights appear once in `parameters()` and `state_dict()`.

Buffer policy: buffers (BatchNorm running statistics, `num_batches_tracked`) are not averaged but
copied from the online modules at every update. They are used only in eval mode, where a target
with its own averaged statistics would disagree with the weights it holds; in train mode BN uses
batch statistics, so the copy changes nothing the target computes during training.

Stop-gradient targets (seed 002's "momentum encoder across families" experiment):
`use_stop_gradient_targets(method)` calls `share_online()` on every EMA of a method. The target then
has no weights of its own: it runs the online modules under no_grad (outputs detached) and
`update()` does nothing, i.e. momentum 0 without a second copy. The method's code is unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA(nn.Module):
    """Frozen copies of `online` modules, run in order, updated by an exponential moving average."""

    def __init__(self, *online: nn.Module) -> None:
        super().__init__()
        if not online:
            raise ValueError("EMA needs at least one online module")
        self.online = tuple(online)  # by reference, unregistered: not duplicated in state_dict
        # One deepcopy call for all modules, so parameters shared between them stay shared.
        self.copies = nn.ModuleList(copy.deepcopy(list(online)))
        self.copies.requires_grad_(False)
        self.shares_online = False

    def forward(self, x: Tensor) -> Tensor:
        """The target branch's output; never part of the autograd graph."""
        with torch.no_grad():
            for module in self.online if self.shares_online else self.copies:
                x = module(x)
        return x

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_o over parameters; buffers copied (module docstring)."""
        if self.shares_online:
            return
        online = nn.ModuleList(self.online)  # a temporary container, to walk both trees alike
        targets, sources = list(self.copies.parameters()), list(online.parameters())
        if len(targets) != len(sources):
            raise RuntimeError("EMA target and online modules no longer have the same parameters")
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)
        for target, source in zip(self.copies.buffers(), online.buffers(), strict=True):
            target.copy_(source)

    def share_online(self) -> None:
        """Become a stop-gradient copy: drop the own weights and run the online modules."""
        self.copies = nn.ModuleList()
        self.shares_online = True

    def extra_repr(self) -> str:
        return "stop-gradient copy of the online modules" if self.shares_online else ""


def use_stop_gradient_targets(method: nn.Module) -> int:
    """Turn every EMA target inside `method` into a stop-gradient copy; returns how many."""
    targets = [module for module in method.modules() if isinstance(module, EMA)]
    for target in targets:
        target.share_online()
    return len(targets)
