"""Stores of negatives that outlive a batch: a FIFO queue of keys (MoCo; SwAV's feature queue)."""

from __future__ import annotations

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
