"""Prototypes and their balanced assignment: SwAV's online clustering (Caron et al. 2020, arXiv
2006.09882, §3.1).

`Prototypes` holds K trainable vectors c_k on the unit sphere and scores embeddings against them;
`sinkhorn` turns the scores of a batch into soft codes that spread the batch equally over the
prototypes (the equipartition constraint that keeps every sample from landing in one cluster).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.dist import PROCESSES, GlobalBatch


class Prototypes(nn.Module):
    """K trainable prototype vectors c_1..c_K of dimension D, L2-normalised (SwAV §3.1).

    forward: z (N, D) -> scores z·c_k (N, K), cosine similarities when z is L2-normalised.
    `weight` (K, D) is initialised as nn.Linear's (the code's prototypes are a Linear without
    bias) and normalised at construction; the owner calls `normalize_()` after every optimizer
    step, so every forward sees unit prototypes (the code normalises before every forward).
    """

    def __init__(self, dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype back onto the unit sphere, in place."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight)

    def extra_repr(self) -> str:
        return f"num_prototypes={self.weight.shape[0]}, dim={self.weight.shape[1]}"


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    global_batch: GlobalBatch = PROCESSES,
) -> Tensor:
    """Soft codes with equal prototype shares, by Sinkhorn-Knopp (SwAV §3.1, eq. 3; Cuturi 2013).

    scores (B, K): z_b·c_k for this part's B samples. The samples of all parts of `global_batch`
    (the processes, or every process's micro-batches), B_all in total, are assigned together:
    every sum over samples is all-reduced over them (the code's distributed_sinkhorn). The
    solution of eq. 3 is Q* = Diag(u) exp(CᵀZ/ε) Diag(v), K × B_all; starting from
    P = exp(CᵀZ/ε) / ΣP, each iteration scales the rows (prototypes) to sum 1/K, then the columns
    (samples) to sum 1/B_all. Returns B_all·Qᵀ (B, K), this part's rows: each sample's code sums
    to 1 (exactly: the columns are scaled last) and each prototype receives B_all/K of the codes'
    mass (up to the iterations' convergence).
    No gradient; float32 even under autocast. exp(s/ε) is taken as the code does, without
    subtracting a maximum: cosine scores (|s| ≤ 1) keep it finite for ε ≥ 0.012.
    """
    with torch.autocast(scores.device.type, enabled=False):
        q = torch.exp(scores.float() / epsilon)  # (B, K): Qᵀ
        num_prototypes = q.shape[1]
        all_reduce = global_batch.all_reduce
        num_samples = all_reduce(q.new_tensor(float(q.shape[0])))  # B_all
        q /= all_reduce(q.sum())
        for _ in range(iterations):
            q /= all_reduce(q.sum(dim=0, keepdim=True)) * num_prototypes  # each prototype: 1/K
            q /= q.sum(dim=1, keepdim=True) * num_samples  # each sample: 1/B_all
        return q * num_samples
