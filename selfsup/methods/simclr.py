"""SimCLR v1/v2: a simple framework for contrastive learning (Chen et al. 2020, arXiv 2002.05709;
v2: arXiv 2006.10029).

Two augmented views of each image pass through one shared encoder and an MLP projector; NT-Xent
asks each view to find its partner among the other 2N - 1 views of the (gathered) batch. v2 uses
a 3-layer projector (layers=3), bigger SK-ResNets (backbone `sk_ratio`, recipes) and MoCo's memory
(queue_size > 0): a memory network, an EMA of backbone + projector, embeds both views of every
batch, and a FIFO queue of its last K embeddings joins every anchor's denominator as K more
negatives (v2 §2: "+~1 %"; the paper gives no formula, `losses.nt_xent` writes ours). The memory
network's keys are negatives only, never positives, so unlike MoCo it needs no shuffled BN.
train.target=stop_gradient or momentum gives the views a target side (target.py; UniGrad, arXiv
2112.05141, Table 2): each view's anchor z is compared with the other side's t of every view, t
the detached z or a momentum network's embedding (an EMA of its own, beside v2's memory network,
which stop_gradient makes a stop-gradient copy like every EMA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.decomposition import Term, info_nce_parts
from selfsup.dist import gather_nograd
from selfsup.heads import mlp
from selfsup.losses import nt_xent
from selfsup.methods.base import Method
from selfsup.negatives import Queue
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views
from selfsup.target import EMA, TARGET_SETTINGS, SiameseTarget


@METHODS.register("simclr")
class SimCLR(Method):
    """SimCLR v1/v2: shared encoder + MLP projector + NT-Xent over the batch (v2: + a memory queue).

    v2's memory: negatives also from a queue of a momentum network's embeddings of earlier batches.
    """

    target_settings = TARGET_SETTINGS

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        hidden: int = 2048,
        layers: int = 2,  # v2: 3; 0: no projection head, h itself (§4.2 and Fig. 8, "None")
        temperature: float = 0.1,  # ImageNet, batch 4096 (paper Table 5); CIFAR-10 uses 0.5
        queue_size: int = 0,  # K; 0: no memory (v1); v2: 65536 ("memory buffer 64K", v2 §4)
        momentum: float = 0.999,  # the memory network's EMA decay, v2 §4 "according to MoCo"
    ) -> None:
        check_method(
            dim=dim, hidden=hidden, temperature=temperature, queue_size=queue_size,
            momentum=momentum,
        )  # fmt: skip
        super().__init__(backbone)
        if layers == 0:
            dim = backbone.num_features  # the loss sees h
        self.projector = (
            mlp(backbone.num_features, hidden, dim, layers=layers) if layers else nn.Identity()
        )
        self.temperature, self.momentum = temperature, momentum
        # Built only with a memory, so a v1 model's state dict keeps exactly its old keys.
        self.target = EMA(self.backbone, self.projector) if queue_size else None  # memory network
        self.queue = Queue(queue_size, dim) if queue_size else None
        # the target side: as published, or as train.target sets it (target.py)
        self.target_branch = SiameseTarget(self.backbone, self.projector, paper="online")

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        h1, h2 = self.encode([x1, x2])
        z = self.projector(torch.cat([h1, h2]))  # one BN batch over both views
        z1, z2 = z.chunk(2)
        gather = views.global_batch.gather  # the rows of every part of the global batch
        targets = None  # the other side of each similarity: z itself, as published
        if not self.target_branch.is_online:  # or t: z detached, or a momentum network's
            t1, t2 = self.target_branch(torch.cat([x1, x2]), z).chunk(2)
            targets = (gather(t1), gather(t2))
        negatives = None if self.queue is None else self.queue.keys
        loss = nt_xent(gather(z1), gather(z2), self.temperature, negatives, targets)
        out = {}
        if self.queue is not None:
            with torch.no_grad():  # buffered after the step, negatives of later batches
                out["keys"] = F.normalize(self.target(torch.cat([x1, x2])), dim=1)  # (2N, dim)
        with torch.no_grad():
            positive_similarity = F.cosine_similarity(z1, z2, dim=1).mean()
        return {"loss": loss, "pos_sim": positive_similarity, **out}

    def gradient_terms(self, views: Views) -> list[Term]:
        # The anchor side of NT-Xent; SimCLR also sends gradient through the candidates, which the
        # paper's analysis (and this one) stops.
        x1, x2 = views.large[:2]
        n = len(x1)
        raw = self.projector(torch.cat(self.encode([x1, x2])))
        z = F.normalize(raw, dim=1)  # (2N, D)
        # an anchor is not its own candidate
        exclude = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        # train.target=momentum: the candidates are the momentum network's embeddings of both views
        candidates = F.normalize(self.target_branch(torch.cat([x1, x2]), raw).detach(), dim=1)
        if self.queue is not None:  # v2's memory: K more negatives for every anchor
            keys = F.normalize(self.queue.keys, dim=1).to(z.dtype)
            candidates = torch.cat([candidates, keys])
            exclude = F.pad(exclude, (0, len(keys)), value=False)
        positives = torch.arange(2 * n, device=z.device).roll(n)
        parts = info_nce_parts(z, candidates, positives, self.temperature, exclude)
        return [("", parts, candidates[positives])]

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        self.target_branch.update(progress.fraction)
        if self.queue is not None:
            self.queue.push(gather_nograd(out["keys"]))  # what all processes produced
            self.target.update(self.momentum)  # θ_m ← m·θ_m + (1 − m)·θ
