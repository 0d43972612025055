"""Stores of negatives that outlive a batch: a FIFO queue of keys (MoCo; SwAV's feature queue) and
a memory bank of one feature per training image (InstDisc, CMC)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Queue(nn.Module):
    """A FIFO ring of `size` keys of dimension `dim`; the newest keys replace the oldest.

    `keys` (size, dim) and the write pointer `ptr` are persistent buffers, so a checkpoint resumes
    the queue exactly. The keys start as random unit vectors, as in MoCo's code. `push` takes the
    keys of the whole (gathered) batch: the caller passes `dist.gather_nograd(k)`.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a queue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Enqueue `keys` (n, dim) in order, dropping the oldest; any n, any queue size.

        Key j goes to slot (ptr + j) mod size, exactly as n single pushes would: the batch may
        straddle the end of the ring (no "size must be a multiple of the batch" assert as in
        MoCo's code), and of a batch longer than the queue only the newest `size` keys remain.
        """
        size, n = self.keys.shape[0], keys.shape[0]
        slots = (self.ptr + torch.arange(n, device=self.keys.device)) % size  # (n,)
        kept = slice(max(n - size, 0), n)  # later keys would overwrite earlier ones anyway
        self.keys.index_copy_(0, slots[kept], keys[kept].to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % size)

    def extra_repr(self) -> str:
        return f"size={self.keys.shape[0]}, dim={self.keys.shape[1]}"


class MemoryBank(nn.Module):
    """One feature per training image, addressed by dataset index (InstDisc, CMC, hybrid MoCo).

    `features` (size, dim) is a persistent buffer, so a checkpoint resumes the bank exactly. It
    starts uniform in [-s, s] with s = 1/sqrt(dim/3), as in InstDisc's and CMC's code (unit
    expected norm). `update(index, f)` moves the entries of a batch towards its new features and
    renormalises them, v ← normalise(m·v + (1 − m)·f) (Wu et al. 2018, §3.2: m = 0.5; m = 0:
    overwrite). Pass the whole (gathered) batch: `dist.gather_nograd(index)`, `...(f)`.
    """

    def __init__(self, size: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a memory bank needs size >= 1 and dim >= 1, got {size}, {dim}")
        if not 0 <= momentum < 1:
            raise ValueError(f"memory bank momentum must be in [0, 1), got {momentum}")
        bound = 1 / math.sqrt(dim / 3)
        self.register_buffer("features", torch.rand(size, dim).mul_(2 * bound).sub_(bound))
        self.momentum = momentum

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: Tensor) -> Tensor:
        """The stored features of `index` (any shape of indices) -> index.shape + (dim,)."""
        return self.features[index.to(self.features.device)]

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """Indices drawn uniformly with replacement (InstDisc's noise distribution P_n = 1/n)."""
        return torch.randint(len(self), shape, generator=generator, device=self.features.device)

    def similarity(self, query: Tensor, rows: Tensor) -> Tensor:
        """query_i · v_j for the bank rows j = rows[i, :]: (N, D), (N, K) -> (N, K).

        Gradient reaches `query`, never the bank. Gathering the N·K rows moves N·K·D numbers;
        when the bank has fewer rows than K·D (Fashion-MNIST's 60k against K·D = 4096·128) the
        full product query @ bankᵀ, (N, n), is cheaper, and that is what is computed then.
        """
        bank = self.features.to(query.dtype)
        rows = rows.to(bank.device)
        if len(self) <= rows.shape[1] * bank.shape[1]:
            return (query @ bank.T).gather(1, rows)
        return torch.einsum("nd,nkd->nk", query, bank[rows])

    @torch.no_grad()
    def update(self, index: Tensor, features: Tensor) -> None:
        """v ← normalise(m·v + (1 − m)·f) for the rows `index` (n,) with new features (n, dim)."""
        index = index.to(self.features.device)
        old = self.features[index]
        new = F.normalize(old * self.momentum + features.to(old.dtype) * (1 - self.momentum), dim=1)
        self.features.index_copy_(0, index, new)

    def extra_repr(self) -> str:
        return f"size={len(self)}, dim={self.features.shape[1]}, momentum={self.momentum}"
