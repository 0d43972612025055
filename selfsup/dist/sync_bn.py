"""Batch norm over the global batch of every process (train.sync_bn): torch's SyncBatchNorm on
CUDA, ours on CPU (gloo)."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import Tensor

from selfsup.dist.collectives import processes


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
