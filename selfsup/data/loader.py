"""Device-resident mini-batches in a seeded order that a checkpoint can resume exactly."""

from __future__ import annotations

import torch
from torch import Tensor


class Batches:
    """Shuffled mini-batches of a uint8 image tensor, one fresh permutation per epoch, drop_last.

    The permutation of epoch e depends only on (seed, e), so the state is two integers.
    `batch_size` is the global batch: on `world` processes every process walks the same
    permutation and takes rows [rank·B/W, (rank+1)·B/W) of each global batch, so the order, and
    the state that resumes it, do not depend on the number of processes.
    """

    def __init__(
        self,
        images: Tensor,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size > len(images):
            raise ValueError(
                f"batch_size {batch_size} is larger than the dataset ({len(images)} images); "
                f"lower optim.batch_size"
            )
        if batch_size % world:
            raise ValueError(
                f"optim.batch_size={batch_size} (the global batch) does not split evenly over "
                f"{world} processes; choose a multiple of {world}"
            )
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.rank, self.world = rank, world
        self.device = images.device if device is None else torch.device(device)
        self.epoch, self.position = 0, 0
        self._order: tuple[int, Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.images) // self.batch_size

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world

    def order(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            permutation = torch.randperm(len(self.images), generator=generator)
            self._order = (epoch, permutation.to(self.images.device))
        return self._order[1]

    def next(self) -> tuple[Tensor, Tensor]:
        """This process's part of the next batch: images (B/W, C, H, W) uint8 and their dataset
        indices (B/W,)."""
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size + self.rank * self.local_batch_size
        index = self.order(self.epoch)[start : start + self.local_batch_size]
        self.position += 1
        # a memory-mapped split stays on the host: each batch is read from it, then moved
        return self.images[index].to(self.device, non_blocking=True), index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
