"""The method contract: what every self-supervised method is to the engine.

A method is a backbone plus what its paper adds (heads, a target branch, negatives, a loss). It
sees augmented views and training progress, never labels, devices, optimizers or logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Progress:
    step: int  # optimizer steps done before this one
    epoch: float  # step / steps_per_epoch
    fraction: float  # step / total_steps, in [0, 1]


@dataclass
class Views:
    large: list[Tensor]  # global crops, each (N, C, H, W); the first two are "the two views"
    small: list[Tensor] = field(default_factory=list)  # multi-crop local views
    index: Tensor | None = None  # dataset indices (N,), for memory banks


class Method(nn.Module):
    """Backbone plus what a paper adds. Subclasses build their parts and define `forward`."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        """Return {"loss": scalar, **scalars to log}."""
        raise NotImplementedError

    def after_step(self, progress: Progress) -> None:
        """Per-step state updates after the optimizer step (EMA, ...); run under no_grad."""

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at the base learning rate without the schedule (SimSiam §4.4)."""
        return []

    def encode(self, crops: list[Tensor]) -> list[Tensor]:
        """Backbone features of each crop; crops of equal size go through in one batch."""
        out: list[Tensor | None] = [None] * len(crops)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, crop in enumerate(crops):
            by_shape.setdefault(tuple(crop.shape[1:]), []).append(i)
        for indices in by_shape.values():
            features = self.backbone(torch.cat([crops[i] for i in indices]))
            for i, chunk in zip(indices, features.chunk(len(indices)), strict=True):
                out[i] = chunk
        return out  # type: ignore[return-value]
