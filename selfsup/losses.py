"""Loss functions as pure math on tensors: no state, no detaching, no gathering.

Methods decide what is detached, gathered or queued (house rule R3); each function here is the
formula from its paper, written with log-softmax / cross-entropy for numerical safety.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) averaged over all 2N anchors.

    z1, z2 (N, D): embeddings of the two views; row i of z1 and row i of z2 are the positive pair,
    the other 2N - 2 embeddings are negatives. sim(u, v) = cosine similarity:
        l(i, j) = -log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ)
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    n = z1.shape[0]
    logits = z @ z.T / temperature  # (2N, 2N)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(
        self_mask, float("-inf")
    )  # k ≠ i: an anchor is not its own negative
    positive = torch.arange(2 * n, device=z.device).roll(n)  # i <-> i + N
    return F.cross_entropy(logits, positive)


def info_nce(query: Tensor, key: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """InfoNCE as a (1 + K)-way classification with the positive at index 0 (MoCo eq. 1).

    query, key (N, D): unit vectors, key[i] is query[i]'s positive; negatives (K, D): unit vectors
    shared by all queries (MoCo's queue).
        L = -log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_i exp(q·k_i/τ))
    """
    positive = (query * key).sum(dim=1, keepdim=True)  # (N, 1)
    negative = query @ negatives.T  # (N, K)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (N, 1 + K)
    target = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, target)


def regression(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's loss (Grill et al. 2020, eq. 2): ||p̄ - z̄||² = 2 - 2·cos(p, z), batch mean.

    prediction, target (N, D).
    """
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=1)).mean()


def negative_cosine(prediction: Tensor, target: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, z) (Chen & He 2021, eq. 1), batch mean. (N, D) each."""
    return -F.cosine_similarity(prediction, target, dim=1).mean()
