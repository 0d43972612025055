"""MoCo v1/v2: momentum contrast (He et al. 2019, arXiv 1911.05722; Chen et al. 2020, arXiv
2003.04297).

A query must pick its positive key out of a FIFO queue of keys from earlier batches (InfoNCE,
(1 + K)-way); keys come from a slowly moving EMA copy of the query encoder, so the queue stays
consistent while its size is decoupled from the batch size. Unlike SimCLR (simclr.py), negatives
are not the other views of the batch and the key branch gets no gradient. v1 and v2 are one class:
v2 adds an MLP head (mlp_hidden), blur in the views, τ = 0.2 and a cosine schedule (recipes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.dist import gather_nograd, shuffled
from selfsup.heads import mlp
from selfsup.losses import info_nce
from selfsup.methods.base import Method
from selfsup.negatives import Queue
from selfsup.params import require_positive
from selfsup.registry import METHODS
from selfsup.step import Progress, Views
from selfsup.target import EMA


@METHODS.register("moco")
class MoCo(Method):
    """MoCo v1/v2: query vs momentum-encoded key among a queue of negatives (InfoNCE)."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        mlp_hidden: int | None = None,  # None: v1's linear head; v2: 2048 (the ResNet-50 width)
        queue_size: int = 65536,  # K (§4.1)
        momentum: float = 0.999,  # m: the best of §4.1's ablation (0.9 is worse, 0 fails)
        temperature: float = 0.07,  # τ; v2 uses 0.2
        shuffle_bn_groups: int = 8,  # BN groups of the key batch: MoCo's 8 GPUs (§3.3); 1: off
        symmetric: bool = False,  # both views as query and key (MoCo's CIFAR demo), 2 keys/sample
    ) -> None:
        require_positive(dim=dim, queue_size=queue_size, temperature=temperature)
        super().__init__(backbone)
        width = backbone.num_features
        # v2's head is fc-ReLU-fc without BN, as in MoCo v2's code.
        self.projector = (
            mlp(width, mlp_hidden, dim, norm=None) if mlp_hidden else nn.Linear(width, dim)
        )
        self.target = EMA(self.backbone, self.projector)  # the key encoder
        self.queue = Queue(queue_size, dim)
        self.momentum, self.temperature = momentum, temperature
        self.shuffle_bn_groups, self.symmetric = shuffle_bn_groups, symmetric

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        pairs = [(x1, x2), (x2, x1)] if self.symmetric else [(x1, x2)]
        loss, keys, positive_similarity = 0.0, [], 0.0
        for x_query, x_key in pairs:
            q = F.normalize(self.projector(self.backbone(x_query)), dim=1)  # (N, dim)
            with torch.no_grad():  # keys carry no gradient (§3.2)
                k = shuffled(self.target, x_key, self.shuffle_bn_groups)
                k = F.normalize(k, dim=1)  # (N, dim)
            loss = loss + info_nce(q, k, self.queue.keys, self.temperature)  # logits (N, 1 + K)
            keys.append(k)
            positive_similarity = positive_similarity + (q.detach() * k).sum(dim=1).mean()
        with torch.no_grad():
            z_std = q.detach().std(dim=0).mean()  # ≈ 1/sqrt(dim) when spread, 0 on collapse
        return {
            "loss": loss,
            "pos_sim": positive_similarity / len(pairs),
            "z_std": z_std,
            "keys": torch.cat(keys),  # enqueued after the step (Algorithm 1)
        }

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        self.queue.push(gather_nograd(out["keys"]))  # what all processes produced
        self.target.update(self.momentum)  # θ_k ← m·θ_k + (1 − m)·θ_q (eq. 2)
