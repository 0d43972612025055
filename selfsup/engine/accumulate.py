"""Large batches on small memory: one optimizer step over M micro-batches (train.accumulate).

Plain gradient accumulation is exact only for losses that are means over samples (BYOL, SimSiam,
supervised). A loss that couples the batch (NT-Xent's negatives, Barlow Twins' cross-correlation,
SwAV's Sinkhorn, ...) computed per micro-batch would be another loss: SimCLR at 4096 accumulated
from 16 x 256 would see 510 negatives per anchor, not 8190. Gradient caching (Gao et al. 2021,
"Scaling deep contrastive learning batch size under memory limited setup") keeps it exact, in
three passes over the micro-batches: one without a graph caches what each gathers; one with the
parameters frozen takes the gradient of every micro-batch's loss with respect to the gathered
tensors; one with the graph then runs each micro-batch, its gathers answered from the cache, and
its rows of the gathered tensors receive their part of that gradient. The M backward passes sum
to the large batch's gradient. That state is an object the step owns: a `dist.MicroBatches`,
made for each step and carried by each micro-batch's views as their `global_batch`. The method's
code is unchanged: it gathers through `views.global_batch` (`gather`, `rank`, `parts`, ...),
and micro-batches are to it what processes are, so whatever is exact on several processes is
exact here, and the two combine (each process's share is split into micro-batches). Each
micro-batch draws its own random numbers (dropout, sampled negatives), the same in each of its
passes; MoCo's shuffle is micro-batch 0's for all of them.

State updates (EMA, queue, memory bank, DINO's centre, UniGrad's F) happen once per step, after
the optimizer step, with what the micro-batches returned concatenated in order, as a gather would
return them. Batch norm is the one thing that stays per micro-batch: each normalises its own rows
(as each process does without train.sync_bn), and its running statistics take M updates a step.
The cost, for methods that gather: the caching pass and the gradient pass are forward passes
without the encoder's graph, about a third of a step each (MoCo: two caching sweeps, its shuffled
keys are encoded from other micro-batches' images); methods without gathers (BYOL, SimSiam,
supervised) run as plain accumulation. Under DDP the gradients are exchanged once per step: the
backward passes of micro-batches 0..M-2 run under DDP's `no_sync` and add to .grad on each process,
and the last one's all-reduces the sum (the first step exchanges after every micro-batch: see
`Accumulation.run`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import selfsup.dist as dist
from selfsup.step import Progress, Views

MAX_SWEEPS = 4  # recording sweeps before the gathers' inputs must have settled


class Accumulation:
    """Runs the M micro-batches of one step; learns on the first step how many recording sweeps
    the method needs (0: it gathers nothing)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.sweeps: int | None = None
        # the DDP wrappers that have run a step here: their gradients are exchanged once a step
        self.exchanged: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def split(self, views: Views, global_batch: dist.MicroBatches) -> list[Views]:
        """The micro-batches of `views`, each carrying `global_batch` (the step's state)."""
        n = views.large[0].shape[0]
        if n % self.count:
            raise ValueError(
                f"train.accumulate={self.count} does not divide this process's batch of {n} "
                f"images; choose optim.batch_size as a multiple of processes x train.accumulate"
            )

        def part(x: Tensor | None, m: int) -> Tensor | None:
            size = x.shape[0] // self.count if x is not None else 0
            return None if x is None else x[m * size : (m + 1) * size]

        return [
            Views(
                large=[part(x, m) for x in views.large],
                small=[part(x, m) for x in views.small],
                index=part(views.index, m),
                labels=part(views.labels, m),
                global_batch=global_batch,
            )
            for m in range(self.count)
        ]

    def run(
        self,
        method: nn.Module,
        model: nn.Module,
        views: Views,
        progress: Progress,
        precision: Any,
    ) -> dict[str, Any]:
        """Forward and backward of every micro-batch (gradients summed into .grad, the loss of
        each divided by M); returns their outputs merged (`merge`)."""
        state = dist.MicroBatches(self.count)  # this step's: what its micro-batches gathered
        parts = self.split(views, state)
        # Each micro-batch draws its own random numbers (dropout, sampled negatives), the same
        # in each of its passes: a seed per micro-batch from one draw of the global RNG.
        base = int(torch.randint(2**62, (1,)))
        after = _rng_state()
        rng = [base + m for m in range(self.count)]
        if self.sweeps != 0:
            saved = batch_norm_state(method)
            self._record(method, parts, progress, precision, state, rng)
            if state.gathers:
                self._gradients(method, parts, progress, precision, state, rng)
            restore_state(saved)  # those passes leave batch norm's running statistics as they were
        state.scale = (
            precision.scaler.get_scale() / self.count
            if precision.scaler.is_enabled()
            else 1 / self.count
        )
        # Under DDP the micro-batches' gradients add up on each process and are averaged over
        # the processes once, in the last backward pass. Not in the wrapper's first step: DDP's
        # static graph learns the used parameters from its first backward pass, which must
        # exchange (torch 2.13 fails an internal assert in a first backward under no_sync,
        # pytorch/pytorch#187732), so that step exchanges after every micro-batch.
        local = self.count - 1 if model in self.exchanged else 0  # micro-batches under no_sync
        outs = []
        for out in _passes(model, parts, progress, precision, state, rng, "live", local):
            precision.scaler.scale(out["loss"] / self.count).backward()
            outs.append(out)
        if isinstance(model, DistributedDataParallel):
            self.exchanged.add(model)
        _set_rng_state(after)  # the global RNG goes on from its one draw
        return merge(outs)

    def _gradients(
        self,
        method: nn.Module,
        parts: list[Views],
        progress: Progress,
        precision: Any,
        state: dist.MicroBatches,
        rng: list[int],
    ) -> None:
        """Σ_j ∂L_j/∂G for every gather G, with the parameters frozen so that only the loss's
        part of the graph is built (and no parameter accumulates a gradient: DDP's hooks, which
        a backward pass outside its wrapper would confuse in its first step, never fire)."""
        trainable = [p for p in method.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                for out in _passes(method, parts, progress, precision, state, rng, "gradient"):
                    state.backward(out["loss"])
        finally:
            for p in trainable:
                p.requires_grad_(True)
        state.share_totals()

    def _record(
        self,
        method: nn.Module,
        parts: list[Views],
        progress: Progress,
        precision: Any,
        state: dist.MicroBatches,
        rng: list[int],
    ) -> None:
        learning = self.sweeps is None
        sweeps = 0
        with torch.no_grad():
            while True:
                for _ in _passes(method, parts, progress, precision, state, rng, "record"):
                    pass
                sweeps += 1
                if not state.used:  # no gathers: plain accumulation from now on
                    self.sweeps = 0
                    break
                if not learning and sweeps == self.sweeps:
                    break
                # every process sweeps as often as the slowest to settle: the sweeps' gathers
                # and synchronised batch norms are collectives that must pair up
                if learning and dist.maximum(0.0 if state.settled() else 1.0) == 0.0:
                    self.sweeps = sweeps - 1  # the sweep before this one was already right
                    break
                if sweeps == MAX_SWEEPS + 1:
                    raise RuntimeError(
                        f"train.accumulate: the method's gathered inputs still change after "
                        f"{MAX_SWEEPS} sweeps over the micro-batches; set train.accumulate=1"
                    )


def _passes(
    module: nn.Module,
    parts: list[Views],
    progress: Progress,
    precision: Any,
    state: dist.MicroBatches,
    rng: list[int],
    mode: str,
    local: int = 0,
) -> Iterator[dict[str, Any]]:
    """Each micro-batch's forward as a `mode` pass of `state` (the parts' `global_batch`), with
    that micro-batch's seed (the same random draws in each of its passes); yields the output
    inside the pass, so that the caller's backward belongs to it. The first `local` micro-batches
    run under DDP's no_sync (forward and backward: DDP prepares its exchange in the forward), so
    that their gradients stay on this process until a later backward pass exchanges the sum."""
    for m, part in enumerate(parts):
        torch.manual_seed(rng[m])
        quiet = m < local and isinstance(module, DistributedDataParallel)
        with module.no_sync() if quiet else contextlib.nullcontext():
            state.begin(m, mode)
            with precision.autocast():
                out = module(part, progress)
            state.end()
            yield out


def merge(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """The outputs of the micro-batches as one step's: scalars (0-d) averaged, tensors and lists
    of tensors concatenated along dim 0 in micro-batch order (as a gather returns the parts'
    rows, which after_step already expects), anything else the last one's."""
    merged: dict[str, Any] = {}
    for key, first in outs[0].items():
        values = [out[key] for out in outs]
        if isinstance(first, Tensor) and first.dim() == 0:
            merged[key] = torch.stack([v.detach() for v in values]).mean()
        elif isinstance(first, Tensor):
            merged[key] = torch.cat([v.detach() for v in values])
        elif isinstance(first, (list, tuple)) and all(isinstance(v, Tensor) for v in first):
            merged[key] = [torch.cat([v[i].detach() for v in values]) for i in range(len(first))]
        else:
            merged[key] = values[-1]
    return merged


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def batch_norm_state(module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(buffer, its copy) for the running statistics of every batch norm layer: what a forward
    pass in training mode changes, to be put back with `restore_state`."""
    return [
        (buffer, buffer.clone())
        for layer in module.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm)
        for buffer in layer.buffers(recurse=False)
    ]


def restore_state(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buffer, copy in saved:
            buffer.copy_(copy)
