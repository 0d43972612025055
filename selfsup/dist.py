"""The one place that talks to torch.distributed; the gathers are the identity on one process."""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def process_rank() -> int:
    """This process's rank among the processes (0 on one process)."""
    return torch_dist.get_rank() if is_distributed() else 0


def processes() -> int:
    """The number of processes."""
    return torch_dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """The rank of the batch a method's forward sees among all the parts of the global batch: the
    process's rank, or during a step of micro-batches (train.accumulate) the micro-batch's among
    all processes' micro-batches (`MicroBatches`)."""
    if _micro is None:
        return process_rank()
    return process_rank() * _micro.count + _micro.index


def world_size() -> int:
    """How many parts the global batch has: processes, times micro-batches during accumulation."""
    return processes() * (1 if _micro is None else _micro.count)


class MicroBatches:
    """The global batch's parts that one process runs one after another (train.accumulate): to
    a method's forward, micro-batch m of process p is part p·M + m of W·M, as if it were a process
    of its own (`rank`, `world_size`), and the gathers return every part's rows, so that a loss
    over the gathered batch is the loss of the whole batch (gradient caching, Gao et al. 2021).

    The objective is the one of W·M processes: the mean over the parts of each part's loss L_j.
    Three kinds of pass, each over every micro-batch (engine/accumulate.py):
    - "record", without gradient: the inputs of every gather and all-reduce, in call order, are
      cached. A gathered input that comes from another gather (MoCo's shuffled keys) is wrong in
      the first sweep, whose gathers only know their own rows; sweeps repeat until the inputs
      stop changing (`settled`).
    - "gradient", with the parameters frozen: each gather (with gradient) returns the cached
      global tensor G as a leaf, and Σ_j ∂L_j/∂G is summed over all parts (`backward`).
    - "live", with gradient: gathers return the cached G, and in the backward pass this
      micro-batch's rows receive their slice of Σ_j ∂L_j/∂G (times the loss scale), instead of
      their share of L_m alone: what `gather`'s all-reduce does across processes.
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
        """`dist.gather` during the passes: every part's rows (all processes'); see the class."""
        call = self.calls
        gathered = _gather_processes(torch.cat(self._parts(x, "gather")))
        if self.mode == "gradient":
            self.leaves[call] = gathered.requires_grad_()
            return gathered
        if self.mode == "live":
            rows = x.shape[0]
            start = (process_rank() * self.count + self.index) * rows
            total = self.totals.get(call)
            share = None if total is None else total[start : start + rows] * self.scale
            return _Injected.apply(x, gathered, share)
        return gathered

    def gather_nograd(self, x: Tensor) -> Tensor:
        return _gather_processes(torch.cat(self._parts(x.detach(), "nograd")))

    def shared(self, x: Tensor) -> Tensor:
        """Micro-batch 0's `x` on every micro-batch (a random draw they must agree on: MoCo's
        shuffle, which processes take from rank 0)."""
        call = self.calls
        if self.mode == "record" and self.index == 0:
            self._parts(x, "shared")
            return x
        self._parts(x, "shared")  # recorded, or checked against the recording
        return self.cache[0][call]

    def sum(self, x: Tensor) -> Tensor:
        """The sum of this call's inputs over the micro-batches (then over the processes)."""
        return torch.stack(self._parts(x.detach(), "sum")).sum(dim=0)


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


_micro: MicroBatches | None = None  # set by `micro_batches` for the passes of one step


@contextmanager
def micro_batches(state: MicroBatches) -> Iterator[MicroBatches]:
    """Run the block as part `state.index` of `state.count` micro-batches (see MicroBatches)."""
    global _micro
    previous, _micro = _micro, state
    try:
        yield state
    finally:
        _micro = previous


T = TypeVar("T")
# How long a collective waits for a missing process before it raises instead of hanging: longer
# than rank 0's slowest solo work (a kNN monitor pass, a checkpoint), shorter than a lost night.
TIMEOUT = datetime.timedelta(minutes=15)


@contextmanager
def process_group_from_env() -> Iterator[None]:
    """Join the process group that torchrun describes (WORLD_SIZE > 1 in the environment) for
    the duration of the block, and leave it afterwards, also on errors.

    Collectives on CPU tensors go through gloo and on CUDA tensors through NCCL; a process that
    stops answering makes the others raise after `TIMEOUT` instead of waiting forever (torchrun
    itself also ends the other processes when one fails). Nothing happens on one process, or when
    the caller has already joined a group (tests).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        yield
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """`device` for this process: on several processes CUDA means cuda:LOCAL_RANK (one GPU each)."""
    if device.type != "cuda" or processes() == 1:
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    return device


def from_rank0(make: Callable[[], T]) -> T:
    """`make()` run on rank 0 only, its result returned on every process: one run folder name,
    one decision. An exception on rank 0 is raised there and, with its message, on every other
    process, so that no process waits for a partner that has stopped."""
    if processes() == 1:
        return make()
    box: list[Any] = [None]
    failure = None
    if process_rank() == 0:
        try:
            box = [(True, make())]
        except Exception as error:  # noqa: BLE001  (its text goes to the others, then re-raised)
            failure, box = error, [(False, (type(error), str(error)))]
    torch_dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if failure is not None:
        raise failure
    if not ok:
        kind, message = value
        try:  # the same kind of error, so that the CLI prints one line on every process
            error = kind(message)
        except TypeError:  # an exception with other constructor arguments
            error = RuntimeError(f"rank 0 failed: {kind.__name__}: {message}")
        raise error
    return value


def barrier() -> None:
    if processes() > 1:
        torch_dist.barrier()


def mean(x: Tensor) -> Tensor:
    """The mean of `x` over all processes (the logged scalars of one global step), no gradient."""
    if processes() == 1:
        return x
    total = x.detach().clone()
    torch_dist.all_reduce(total)
    return total / processes()


def maximum(value: float) -> float:
    """The largest `value` of all processes (the slowest step time decides a shared budget)."""
    if processes() == 1:
        return value
    x = torch.tensor([value], dtype=torch.float64)
    torch_dist.all_reduce(x, op=torch_dist.ReduceOp.MAX)
    return x.item()


def _gather_processes(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from all processes along dim 0, without gradient."""
    if processes() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(processes())]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_nograd(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from all parts of the global batch along dim 0, without gradient:
    every process's, and during accumulation every micro-batch's (MicroBatches)."""
    if _micro is not None:
        return _micro.gather_nograd(x)
    return _gather_processes(x)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        ctx.n = x.shape[0]
        return _gather_processes(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        # Every process computes the same loss on the gathered batch; summing the gradients and
        # taking this process's slice, then DDP's averaging, gives the exact global-batch gradient.
        grad = grad.contiguous()
        torch_dist.all_reduce(grad)
        return grad[process_rank() * ctx.n : (process_rank() + 1) * ctx.n]


def gather(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from all parts of the global batch along dim 0; gradients flow
    back to each part (to this micro-batch's rows only during accumulation)."""
    if _micro is not None:
        return _micro.gather(x)
    return x if processes() == 1 else _Gather.apply(x)


def shuffled(
    module: Callable[[Tensor], Tensor],
    x: Tensor,
    groups: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`module(x)` with batch norm statistics of random sub-batches: MoCo's shuffling BN (§3.3).

    The global batch is permuted and split into `groups` BN groups (per process: groups divided by
    the number of processes, at least 1), each sub-batch goes through `module` on its own, and
    the permutation is undone, so row i of the result is the output for x[i]. A positive key is
    then normalised with statistics of other samples than its query's, which closes the
    "intra-batch communication" shortcut. On several processes each one contributes its batch and
    gets its own rows back (MoCo's batch_shuffle_ddp): equal sizes on all processes, and no
    gradient across processes (it is meant for keys).
    The permutation comes from `generator` or torch's global RNG (checkpointed by the engine).
    """
    world = world_size()
    if world == 1 and groups <= 1:
        return module(x)  # one group over the whole batch: a permutation changes nothing
    n = x.shape[0]
    x_all = gather_nograd(x)  # (world·n, ...)
    permutation = torch.randperm(x_all.shape[0], generator=generator, device=x.device)
    if _micro is not None:
        permutation = _micro.shared(permutation)  # every micro-batch shuffles the same way
    if processes() > 1:
        torch_dist.broadcast(permutation, src=0)  # every process shuffles the same way
    mine = permutation[rank() * n : (rank() + 1) * n]  # rows this process encodes
    chunks = x_all[mine].tensor_split(max(groups // world, 1))
    out_mine = torch.cat([module(chunk) for chunk in chunks])  # BN statistics per chunk
    out_all = gather_nograd(out_mine)  # row j is the output for x_all[permutation[j]]
    inverse = torch.argsort(permutation)
    return out_all[inverse[rank() * n : (rank() + 1) * n]]


def all_reduce(x: Tensor) -> Tensor:
    """The sum of `x` over all parts of the global batch (processes, and micro-batches during
    accumulation), for sums that need no gradient (SwAV's Sinkhorn): a new tensor, or `x` itself
    on one process, like the gathers."""
    if _micro is not None:
        x = _micro.sum(x)
    if processes() == 1:
        return x
    total = x.detach().clone()
    torch_dist.all_reduce(total)
    return total


def data_parallel(method: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`method` wrapped in DistributedDataParallel on several processes (itself on one): its
    forward runs as before and backward averages the gradients over the processes.

    Each process computes its loss on its 1/W of the global batch, or on the gathered global batch
    (`gather`'s backward then sums); either way the average is the one-process gradient of the
    global batch.
    broadcast_buffers=False: queues, memory banks and DINO's centre are filled from gathered or
    all-reduced tensors, so they are equal on every process without sending them each step (MoCo's
    65536-key queue would be); BN running statistics stay per process and rank 0's are saved.
    static_graph=True: the trainable parameters that a method's loss uses are the same at every
    step, but not always all of them (CPC's predictors for offsets beyond a small patch grid);
    DDP learns the set in the first step, where find_unused_parameters=True would search the
    autograd graph at every step. Frozen parts (EMA targets, teachers) have requires_grad False.
    """
    if processes() == 1:
        return method
    device_ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # torch 2.13 renames it; the old name works from 2.3 on
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(
            method, device_ids=device_ids, broadcast_buffers=False, static_graph=True
        )


def _global_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel of x (N, C, ...): the mean and the biased variance over all rows of all
    processes, and their number M; float64, since Σx²/M − μ² cancels badly in float32."""
    x = x.detach().double()
    dims = [d for d in range(x.dim()) if d != 1]
    count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)
    sums = torch.cat([x.sum(dims), x.square().sum(dims), count])
    torch_dist.all_reduce(sums)
    channels = x.shape[1]
    total = sums[-1]
    mean = sums[:channels] / total
    var = (sums[channels : 2 * channels] / total - mean.square()).clamp(min=0)
    return mean, var, total


class _SyncBatchNorm(torch.autograd.Function):
    """Batch norm of x (N, C, ...) with the statistics of every process's rows (ours for gloo:
    torch's SyncBatchNorm runs only on CUDA). Per channel over all M rows of all processes:
        μ = Σx / M,  σ² = Σx² / M − μ²,  x̂ = (x − μ) / sqrt(σ² + ε),  y = γ x̂ + β
    and, with g = ∂L/∂y where L is the sum of all processes' losses (DDP then averages),
        ∂L/∂x = γ / sqrt(σ² + ε) · (g − Σg / M − x̂ · Σ(g x̂) / M)
    whose two sums run over all processes, as torch's batch_norm_backward_elemt.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, total):  # noqa: ANN001, ANN205
        ctx.shape = [1, -1] + [1] * (x.dim() - 2)
        ctx.dims = [d for d in range(x.dim()) if d != 1]
        x_hat = (x - mean.view(ctx.shape)) * invstd.view(ctx.shape)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.total = total
        if weight is None:
            return x_hat
        return x_hat * weight.view(ctx.shape) + bias.view(ctx.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x_hat, invstd, weight = ctx.saved_tensors
        shape, dims = ctx.shape, ctx.dims
        sum_grad, sum_grad_x_hat = grad.sum(dims), (grad * x_hat).sum(dims)
        # γ and β: this process's rows only; DDP sums (and averages) them over the processes
        grad_weight = None if weight is None else sum_grad_x_hat.clone()
        grad_bias = None if weight is None else sum_grad.clone()
        both = torch.cat([sum_grad, sum_grad_x_hat])
        torch_dist.all_reduce(both)
        mean_grad, mean_grad_x_hat = (both / ctx.total.to(grad.dtype)).chunk(2)
        scale = invstd if weight is None else invstd * weight
        grad_x = grad - mean_grad.view(shape) - x_hat * mean_grad_x_hat.view(shape)
        return grad_x * scale.view(shape), grad_weight, grad_bias, None, None, None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all processes on CPU (gloo): a drop-in for
    BatchNorm1d/2d/3d with the same parameters and buffers (checkpoints are unchanged). On one
    process, or in eval mode, it is exactly torch's batch norm; the running averages take the
    global statistics (the unbiased variance, as torch)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm needs (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or processes() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        mean, var, total = _global_moments(x)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum
                if momentum is None:  # torch's cumulative average
                    momentum = 1 / self.num_batches_tracked.item()
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        invstd = (var + self.eps).rsqrt().to(x.dtype)
        return _SyncBatchNorm.apply(x, self.weight, self.bias, mean.to(x.dtype), invstd, total)


def sync_batch_norm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` with every BatchNorm layer replaced by one that normalises over the global batch
    (train.sync_bn): torch's SyncBatchNorm on CUDA, ours (`SyncBatchNorm`) elsewhere. The new
    layers hold the same parameter and buffer tensors, so an optimizer built before still steps
    them and checkpoints keep their keys."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, SyncBatchNorm
    ):
        layer = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        layer.weight, layer.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(layer, name, getattr(module, name))
        layer.train(module.training)
        return layer
    for name, child in module.named_children():
        module.add_module(name, sync_batch_norm(child, device))
    return module
