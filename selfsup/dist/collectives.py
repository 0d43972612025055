"""The process group and the collectives over its processes; the gathers are the identity on one
process. A method's forward reaches them through its batch's `global_batch` (`Processes`, or the
step's `MicroBatches` under train.accumulate), never through state of this module."""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor

T = TypeVar("T")
# How long a collective waits for a missing process before it raises instead of hanging: longer
# than rank 0's slowest solo work (a kNN monitor pass, a checkpoint), shorter than a lost night.
TIMEOUT = datetime.timedelta(minutes=15)


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def process_rank() -> int:
    """This process's rank among the processes (0 on one process)."""
    return torch_dist.get_rank() if is_distributed() else 0


def processes() -> int:
    """The number of processes."""
    return torch_dist.get_world_size() if is_distributed() else 1


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


def gather_nograd(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from all processes along dim 0, in rank order, without gradient."""
    if processes() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(processes())]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        ctx.n = x.shape[0]
        return gather_nograd(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        # Every process computes the same loss on the gathered batch; summing the gradients and
        # taking this process's slice, then DDP's averaging, gives the exact global-batch gradient.
        grad = grad.contiguous()
        torch_dist.all_reduce(grad)
        return grad[process_rank() * ctx.n : (process_rank() + 1) * ctx.n]


def gather(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from all processes along dim 0; gradients flow back to each
    process's rows."""
    return x if processes() == 1 else _Gather.apply(x)


def all_reduce(x: Tensor) -> Tensor:
    """The sum of `x` over all processes, for sums that need no gradient (SwAV's Sinkhorn): a new
    tensor, or `x` itself on one process, like the gathers."""
    if processes() == 1:
        return x
    total = x.detach().clone()
    torch_dist.all_reduce(total)
    return total


class GlobalBatch(Protocol):
    """The parts of the global batch that a batch is one of (`Views.global_batch`): what a
    method's forward uses to see the whole batch. Its parts are the processes (`Processes`), or
    during a step of micro-batches every process's micro-batches (`MicroBatches`)."""

    @property
    def rank(self) -> int:
        """This part's index among all parts: its rows' place in a gathered tensor."""
        ...

    @property
    def parts(self) -> int:
        """How many parts the global batch has."""
        ...

    def gather(self, x: Tensor) -> Tensor:
        """Every part's `x` (N, ...) concatenated along dim 0 in part order; gradients flow back
        to each part's rows."""
        ...

    def gather_nograd(self, x: Tensor) -> Tensor:
        """Every part's `x` (N, ...) concatenated along dim 0 in part order, without gradient."""
        ...

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum of every part's `x`, without gradient."""
        ...

    def shared(self, x: Tensor) -> Tensor:
        """Part 0's `x` on every part (a random draw they must agree on: MoCo's shuffle)."""
        ...


class Processes:
    """The global batch as one part per process: the collectives above (`GlobalBatch`)."""

    @property
    def rank(self) -> int:
        return process_rank()

    @property
    def parts(self) -> int:
        return processes()

    def gather(self, x: Tensor) -> Tensor:
        return gather(x)

    def gather_nograd(self, x: Tensor) -> Tensor:
        return gather_nograd(x)

    def all_reduce(self, x: Tensor) -> Tensor:
        return all_reduce(x)

    def shared(self, x: Tensor) -> Tensor:
        """Rank 0's `x`, written into `x` on every process."""
        if processes() > 1:
            torch_dist.broadcast(x, src=0)
        return x

    def __repr__(self) -> str:
        return "PROCESSES"


PROCESSES = Processes()  # stateless: the default `global_batch` of every batch


def shuffled(
    module: Callable[[Tensor], Tensor],
    x: Tensor,
    groups: int = 1,
    generator: torch.Generator | None = None,
    global_batch: GlobalBatch = PROCESSES,
) -> Tensor:
    """`module(x)` with batch norm statistics of random sub-batches: MoCo's shuffling BN (§3.3).

    The global batch is permuted and split into `groups` BN groups (per part of `global_batch`:
    groups divided by the number of parts, at least 1), each sub-batch goes through `module` on
    its own, and the permutation is undone, so row i of the result is the output for x[i]. A
    positive key is then normalised with statistics of other samples than its query's, which
    closes the "intra-batch communication" shortcut. On several processes each one contributes
    its batch and gets its own rows back (MoCo's batch_shuffle_ddp): equal sizes on all parts, and
    no gradient across parts (it is meant for keys).
    The permutation comes from `generator` or torch's global RNG (checkpointed by the engine);
    every part uses part 0's (`GlobalBatch.shared`).
    """
    world = global_batch.parts
    if world == 1 and groups <= 1:
        return module(x)  # one group over the whole batch: a permutation changes nothing
    n = x.shape[0]
    x_all = global_batch.gather_nograd(x)  # (world·n, ...)
    permutation = torch.randperm(x_all.shape[0], generator=generator, device=x.device)
    permutation = global_batch.shared(permutation)  # every part shuffles the same way
    rank = global_batch.rank
    mine = permutation[rank * n : (rank + 1) * n]  # rows this part encodes
    chunks = x_all[mine].tensor_split(max(groups // world, 1))
    out_mine = torch.cat([module(chunk) for chunk in chunks])  # BN statistics per chunk
    out_all = global_batch.gather_nograd(out_mine)  # row j is the output for x_all[permutation[j]]
    inverse = torch.argsort(permutation)
    return out_all[inverse[rank * n : (rank + 1) * n]]


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
    (train.accumulate's `no_sync` on all micro-batches but the last therefore starts after the
    first step, whose backward passes DDP learns from: engine/accumulate.py.)
    """
    if processes() == 1:
        return method
    device_ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # torch 2.13 renames it; the old name works from 2.3 on
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(
            method, device_ids=device_ids, broadcast_buffers=False, static_graph=True
        )
