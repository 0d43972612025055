"""The momentum (EMA) target branch, and the switch that turns it into a stop-gradient copy.

`EMA(*online)` registers frozen deep copies of the online modules (MoCo's key encoder, BYOL's
target network, DINO's teacher) and runs them in sequence; `update(m)` moves them towards the
online weights, θ_t ← m·θ_t + (1 − m)·θ_o. The online modules are held by reference in a plain
tuple, not registered, so their weights appear once in `parameters()` and `state_dict()`.

Buffer policy: buffers (BatchNorm running statistics, `num_batches_tracked`) are not averaged but
copied from the online modules at every update. They are used only in eval mode, where a target
with its own averaged statistics would disagree with the weights it holds; in train mode BN uses
batch statistics, so the copy changes nothing the target computes during training.

Stop-gradient targets (the momentum encoder across families, Tao et al. 2022 Table 2):
`use_stop_gradient_targets(method)` calls `share_online()` on every EMA of a method. The target then
has no weights of its own: it runs the online modules under no_grad (outputs detached) and
`update()` does nothing, i.e. momentum 0 without a second copy. The method's code is unchanged.

Methods whose one online network embeds both views (SimCLR, SimSiam, Barlow Twins, VICReg) have no
EMA to switch; their target side is a `SiameseTarget`: the online output itself, that output
detached, or a momentum network (UniGrad Table 2's rows), as `use_target_setting(method, setting)`
sets it from train.target. For a method with an EMA of its own (MoCo, MoCo v3, BYOL, DINO,
UniGrad), "momentum" is "method" and "stop_gradient" is `use_stop_gradient_targets`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from selfsup.schedules import cosine_ramp

# train.target: "method" (as the paper), "stop_gradient" (no momentum network: the target side is
# the online network behind a stop-gradient), "momentum" (a momentum network: an EMA of the online
# one). The comparison of UniGrad's Table 2 (Tao et al. 2022, arXiv 2112.05141).
TARGET_SETTINGS = ("method", "stop_gradient", "momentum")


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


class SiameseTarget(nn.Module):
    """The target side t = target(x) of a method whose online network f embeds both views, z = f(x).

        online         t = z: the online output itself, both sides carry gradient
        stop_gradient  t = sg(z): the online output, detached
        momentum       t = f_ξ(x): an EMA of the online modules, no gradient; after every step
                       ξ ← m·ξ + (1 − m)·θ, m = 1 − (1 − m₀)(cos(π·k/K) + 1)/2 from m₀ to 1

    It starts as `paper`, the method as published (SimCLR, Barlow Twins, VICReg: online; SimSiam:
    stop_gradient); `use(setting)` applies train.target. The momentum network is the one UniGrad's
    code gives every family (fundamentalvision/UniGrad project/model.py: a momentum encoder and
    projector; pretrainer.adjust_mm: m₀ = 0.996 in every config, cosine to 1 over the steps).
    """

    def __init__(self, *online: nn.Module, paper: str) -> None:
        super().__init__()
        self.online = tuple(online)  # by reference, unregistered, as in EMA
        self.paper = self.kind = paper
        self.ema: EMA | None = None
        self.momentum = 0.996

    def use(self, setting: str, momentum: float = 0.996) -> None:
        """Apply train.target's `setting` ("method": `paper`); momentum copies the online modules
        as they are now, so call it before training (the build step does)."""
        if setting not in TARGET_SETTINGS:
            raise ValueError(
                f"train.target must be one of {', '.join(TARGET_SETTINGS)}, got {setting!r}"
            )
        self.kind = self.paper if setting == "method" else setting
        self.ema = EMA(*self.online) if self.kind == "momentum" else None
        self.momentum = momentum

    @property
    def is_online(self) -> bool:
        """True when the target is the online output itself (gradient through both sides)."""
        return self.kind == "online"

    def forward(self, x: Tensor, online_output: Tensor | None = None) -> Tensor:
        """t for the views x; `online_output` is z = f(x) when the caller has it (then reused)."""
        if self.ema is not None:
            return self.ema(x)
        if online_output is None:  # no graph unless the target carries gradient
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.is_online):
                online_output = nn.Sequential(*self.online)(x)
        return online_output if self.is_online else online_output.detach()

    def pairs(
        self, views: tuple[Tensor, Tensor], online: tuple[Tensor, Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        """The (online, target) pairs over which a symmetric loss L(a, b) = L(b, a) is averaged:
        ½[L(z1, t2) + L(t1, z2)]. With t = z both pairs are (z1, z2), so one is returned and the
        loss is L(z1, z2) itself, computed once; with sg(z) the value is still L(z1, z2) and the
        gradient half of its gradient (each side receives only its own half)."""
        (x1, x2), (z1, z2) = views, online
        if self.is_online:
            return [(z1, z2)]
        return [(z1, self(x2, z2)), (self(x1, z1), z2)]

    @torch.no_grad()
    def update(self, fraction: float) -> None:
        """The momentum network's EMA step at training progress `fraction`; nothing otherwise."""
        if self.ema is not None:
            self.ema.update(cosine_ramp(self.momentum, 1.0, fraction))

    def extra_repr(self) -> str:
        return f"{self.kind}" + (f", momentum={self.momentum}" if self.ema is not None else "")


def use_target_setting(method: nn.Module, setting: str, momentum: float = 0.996) -> None:
    """Apply train.target to `method`: every SiameseTarget takes `setting` (momentum: m₀ =
    `momentum`); with stop_gradient every EMA becomes a stop-gradient copy as well."""
    for target in [module for module in method.modules() if isinstance(module, SiameseTarget)]:
        target.use(setting, momentum)
    if setting == "stop_gradient":
        use_stop_gradient_targets(method)
