"""One optimisation step, and the numeric precision it runs in."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from selfsup.config import check_choice
from selfsup.engine.accumulate import Accumulation
from selfsup.engine.optim import Schedule
from selfsup.methods.base import Method
from selfsup.step import Progress, Views


class Precision:
    """Autocast context and gradient scaler: bf16 autocast on CUDA by default, fp32 on CPU."""

    def __init__(self, name: str, device: torch.device) -> None:
        check_choice("train.precision", name)
        if name == "auto":
            name = "bf16" if device.type == "cuda" else "fp32"
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.device_type, self.dtype = device.type, dtypes[name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self) -> Any:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def training_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    views: Views,
    progress: Progress,
    precision: Precision,
    clip: float | None = None,
    schedule: Schedule | None = None,
    model: torch.nn.Module | None = None,
    accumulation: Accumulation | None = None,
) -> dict[str, Tensor]:
    """One optimisation step: forward, backward, frozen groups dropped, clipping, the optimizer
    step, then the method's state updates from what forward returned.

    `model`: the module whose forward runs, when it is not `method` itself (its DDP wrapper).
    `accumulation`: run the batch as micro-batches (train.accumulate, engine/accumulate.py).
    """
    scaler = precision.scaler
    if accumulation is not None and accumulation.count > 1:
        optimizer.zero_grad(set_to_none=True)
        out = accumulation.run(method, model or method, views, progress, precision)
    else:
        with precision.autocast():
            out = (model or method)(views, progress)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
    if schedule is not None:
        schedule.drop_frozen_gradients(progress.step)
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(method.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        method.after_step(progress, out)
    return out
