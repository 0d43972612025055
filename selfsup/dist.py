"""The one place that talks to torch.distributed; the gathers are the identity on one process."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as torch_dist
from torch import Tensor


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def gather_nograd(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from all processes along dim 0, without gradient."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
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
        return grad[rank() * ctx.n : (rank() + 1) * ctx.n]


def gather(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from all processes along dim 0; gradients flow back to each."""
    return x if world_size() == 1 else _Gather.apply(x)


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
    if world > 1:
        torch_dist.broadcast(permutation, src=0)  # every process shuffles the same way
    mine = permutation[rank() * n : (rank() + 1) * n]  # rows this process encodes
    chunks = x_all[mine].tensor_split(max(groups // world, 1))
    out_mine = torch.cat([module(chunk) for chunk in chunks])  # BN statistics per chunk
    out_all = gather_nograd(out_mine)  # row j is the output for x_all[permutation[j]]
    inverse = torch.argsort(permutation)
    return out_all[inverse[rank() * n : (rank() + 1) * n]]


def all_reduce(x: Tensor) -> Tensor:
    """The sum of `x` over all processes, for sums that need no gradient (SwAV's Sinkhorn): a new
    tensor, or `x` itself on one process, like the gathers."""
    if world_size() == 1:
        return x
    total = x.detach().clone()
    torch_dist.all_reduce(total)
    return total
