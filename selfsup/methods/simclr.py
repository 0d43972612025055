"""SimCLR v1/v2: a simple framework for contrastive learning (Chen et al. 2020, arXiv 2002.05709;
v2: arXiv 2006.10029).

Two augmented views of each image pass through one shared encoder and an MLP projector; NT-Xent
asks each view to find its partner among the other 2N - 1 views of the (gathered) batch. v2 uses
a 3-layer projector (layers=3), bigger SK-ResNets (backbone `sk_ratio`, recipes) and MoCo's memory
(queue_size > 0): a memory network, an EMA of backbone + projector, embeds both views of every
batch, and a FIFO queue of its last K embeddings joins every anchor's denominator as K more
negatives (v2 §2: "+~1 %"; the paper gives no formula, `losses.nt_xent` writes ours). The memory
network's keys are negatives only, never positives, so unlike MoCo it needs no shuffled BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.dist import gather, gather_nograd
from selfsup.heads import mlp
from selfsup.losses import nt_xent
from selfsup.methods.base import Method
from selfsup.negatives import Queue
from selfsup.params import require_positive
from selfsup.registry import METHODS
from selfsup.step import Progress, Views
from selfsup.target import EMA


@METHODS.register("simclr")
class SimCLR(Method):
    """SimCLR v1/v2: shared encoder + MLP projector + NT-Xent over the batch (v2: + a memory queue).

    v2's memory: negatives also from a queue of a momentum network's embeddings of earlier batches.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        hidden: int = 2048,
        layers: int = 2,  # v2: 3
        temperature: float = 0.1,  # ImageNet, batch 4096 (paper Table 5); CIFAR-10 uses 0.5
        queue_size: int = 0,  # K; 0: no memory (v1); v2: 65536 ("memory buffer 64K", v2 §4)
        momentum: float = 0.999,  # the memory network's EMA decay, v2 §4 "according to MoCo"
    ) -> None:
        require_positive(dim=dim, hidden=hidden, temperature=temperature)
        if queue_size < 0:
            raise ValueError(f"'method.queue_size' must be >= 0 (0: no memory), got {queue_size}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"'method.momentum' must be in [0, 1], got {momentum!r}")
        super().__init__(backbone)
        self.projector = mlp(backbone.num_features, hidden, dim, layers=layers)
        self.temperature, self.momentum = temperature, momentum
        # Built only with a memory, so a v1 model's state dict keeps exactly its old keys.
        self.target = EMA(self.backbone, self.projector) if queue_size else None  # memory network
        self.queue = Queue(queue_size, dim) if queue_size else None

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        h1, h2 = self.encode([x1, x2])
        z1, z2 = self.projector(torch.cat([h1, h2])).chunk(2)  # one BN batch over both views
        out = {}
        if self.queue is None:
            loss = nt_xent(gather(z1), gather(z2), self.temperature)
        else:
            loss = nt_xent(gather(z1), gather(z2), self.temperature, self.queue.keys)
            with torch.no_grad():  # buffered after the step, negatives of later batches
                out["keys"] = F.normalize(self.target(torch.cat([x1, x2])), dim=1)  # (2N, dim)
        with torch.no_grad():
            positive_similarity = F.cosine_similarity(z1, z2, dim=1).mean()
        return {"loss": loss, "pos_sim": positive_similarity, **out}

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        if self.queue is not None:
            self.queue.push(gather_nograd(out["keys"]))  # what all processes produced
            self.target.update(self.momentum)  # θ_m ← m·θ_m + (1 − m)·θ
