"""The global batch's parts when each process runs its share as micro-batches (train.accumulate):
the state of one step's gradient caching, as a `GlobalBatch` that the micro-batches' views carry."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import Tensor

from selfsup.dist.collectives import all_reduce, gather_nograd, process_rank, processes


class MicroBatches:
    """The M micro-batches that one process runs one after another in one step: to a method's
    forward, micro-batch m of process p is part p·M + m of W·M (`rank`, `parts`), as if it were a
    process of its own, and the gathers return every part's rows, so that a loss over the
    gathered batch is the loss of the whole batch (gradient caching, Gao et al. 2021).

    The step (engine/accumulate.py, `Accumulation`) makes one per step and puts it into the views
    of each of its micro-batches (`Views.global_batch`); `begin` says which micro-batch runs now.
    The objective is the one of W·M processes: the mean over the parts of each part's loss L_j.
    Three kinds of pass, each over every micro-batch:
    - "record", without gradient: the inputs of every gather and all-reduce, in call order, are
      cached. A gathered input that comes from another gather (MoCo's shuffled keys) is wrong in
      the first sweep, whose gathers only know their own rows; sweeps repeat until the inputs
      stop changing (`settled`).
    - "gradient", with the parameters frozen: each gather (with gradient) returns the cached
      global tensor G as a leaf, and Σ_j ∂L_j/∂G is summed over all parts (`backward`).
    - "live", with gradient: gathers return the cached G, and in the backward pass this
      micro-batch's rows receive their slice of Σ_j ∂L_j/∂G (times the loss scale), instead of
      their share of L_m alone: what `dist.gather`'s all-reduce does across processes.
    """

    def __init__(self, count: int) -> None:
        self.count, self.index, self.mode = count, 0, "record"
        self.cache: list[list[Tensor]] = []  # [micro-batch][call] -> the input of that call
        self.previous: list[list[Tensor]] | None = None  # the last complete sweep's cache
        self.calls = 0  # calls so far in the current pass
        self.gathers: set[int] = set()  # the calls that are gathers with gradient
        self.leaves: dict[int, Tensor] = {}  # gradient pass: call -> G as a leaf
        self.totals: dict[int, Tensor] = {}  # call -> Σ_j ∂L_j/∂G over all parts
        self.scale = 1.0  # the factor of the live loss: the loss scale / M

    @property
    def rank(self) -> int:
        """The running micro-batch's index among every process's micro-batches."""
        return process_rank() * self.count + self.index

    @property
    def parts(self) -> int:
        """How many parts the global batch has: processes times micro-batches."""
        return processes() * self.count

    def begin(self, index: int, mode: str) -> None:
        """Start micro-batch `index`'s pass: "record", "gradient" or "live"."""
        self.index, self.mode, self.calls, self.leaves = index, mode, 0, {}
        if mode == "record":
            if index == 0 and self.cache:
                self.previous, self.cache = self.cache, []
            self.cache.append([])

    def end(self) -> None:
        """Check that the pass made as many collective calls as the recorded one."""
        expected = len(self.cache[self.index]) if self.index < len(self.cache) else 0
        if self.mode != "record" and self.calls != expected:
            raise RuntimeError(
                f"train.accumulate: the method's forward made {self.calls} gathers for "
                f"micro-batch {self.index}, {expected} when it was recorded; its forward must "
                f"make the same collective calls at every pass (set train.accumulate=1)"
            )

    @property
    def used(self) -> bool:
        """Whether the method's forward gathers anything at all (else the passes are plain
        gradient accumulation and need no recording)."""
        return any(self.cache)

    def settled(self) -> bool:
        """Whether the last recording sweep reproduced the one before it."""
        return self.previous is not None and _same(self.previous, self.cache)

    def backward(self, loss: Tensor) -> None:
        """Gradient pass: add ∂loss/∂G of this pass's gathers to the totals."""
        calls = [call for call in sorted(self.leaves) if self.leaves[call].requires_grad]
        if not calls or not loss.requires_grad:
            return
        grads = torch.autograd.grad(loss, [self.leaves[c] for c in calls], allow_unused=True)
        for call, grad in zip(calls, grads, strict=True):
            if grad is not None:
                self.totals[call] = self.totals.get(call, 0) + grad

    def share_totals(self) -> None:
        """After the gradient pass: the totals summed over the processes too."""
        for call in self.totals:
            if processes() > 1:
                torch_dist.all_reduce(self.totals[call])

    def _parts(self, x: Tensor, kind: str) -> list[Tensor]:
        call, self.calls = self.calls, self.calls + 1
        if self.mode == "record":
            self.cache[self.index].append(x.detach())
            if kind == "gather":
                self.gathers.add(call)
            if self.previous is None:  # first sweep: the others' rows are not known yet
                return [x.detach()] * self.count
            return [
                x.detach() if m == self.index else self.previous[m][call] for m in range(self.count)
            ]
        if self.index >= len(self.cache) or call >= len(self.cache[self.index]):
            raise RuntimeError(
                "train.accumulate: the method's forward made more gathers than when it was "
                "recorded (set train.accumulate=1)"
            )
        recorded = self.cache[self.index][call]
        if recorded.shape != x.shape or not torch.allclose(
            recorded.float(), x.detach().float(), rtol=1e-4, atol=1e-5
        ):
            raise RuntimeError(
                f"train.accumulate: gather {call} of micro-batch {self.index} differs between its "
                f"recording and its training pass: the method's forward is not the same function "
                f"of its micro-batch twice (set train.accumulate=1)"
            )
        return [self.cache[m][call] for m in range(self.count)]

    def gather(self, x: Tensor) -> Tensor:
        """Every part's rows (all processes' micro-batches), in part order; see the class."""
        call = self.calls
        gathered = gather_nograd(torch.cat(self._parts(x, "gather")))
        if self.mode == "gradient":
            self.leaves[call] = gathered.requires_grad_()
            return gathered
        if self.mode == "live":
            rows = x.shape[0]
            start = self.rank * rows
            total = self.totals.get(call)
            share = None if total is None else total[start : start + rows] * self.scale
            return _Injected.apply(x, gathered, share)
        return gathered

    def gather_nograd(self, x: Tensor) -> Tensor:
        return gather_nograd(torch.cat(self._parts(x.detach(), "nograd")))

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum of this call's inputs over the micro-batches, then over the processes."""
        return all_reduce(torch.stack(self._parts(x.detach(), "sum")).sum(dim=0))

    def shared(self, x: Tensor) -> Tensor:
        """Micro-batch 0's `x` on every micro-batch, then rank 0's on every process (a random
        draw they must agree on: MoCo's shuffle)."""
        call = self.calls
        self._parts(x, "shared")  # recorded, or checked against the recording
        if not (self.mode == "record" and self.index == 0):
            x = self.cache[0][call]
        if processes() > 1:
            torch_dist.broadcast(x, src=0)
        return x


def _same(a: list[list[Tensor]], b: list[list[Tensor]]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y)
        and all(
            u.shape == v.shape and torch.allclose(u.float(), v.float(), rtol=1e-4, atol=1e-5)
            for u, v in zip(x, y, strict=True)
        )
        for x, y in zip(a, b, strict=True)
    )


class _Injected(torch.autograd.Function):
    """Forward: `gathered` (the global tensor, x's rows in it). Backward: x receives `share`,
    its rows' part of the gradient of every part's loss, not the gradient that arrives."""

    @staticmethod
    def forward(ctx, x: Tensor, gathered: Tensor, share: Tensor | None) -> Tensor:  # noqa: ANN001
        ctx.share, ctx.shape = share, x.shape
        return gathered.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # noqa: ANN001
        if ctx.share is None:  # the loss does not depend on this gather
            return grad.new_zeros(ctx.shape), None, None
        return ctx.share.to(grad.dtype), None, None
