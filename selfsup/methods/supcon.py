"""Supervised contrastive learning, SupCon (Khosla et al. 2020, arXiv 2004.11362).

SimCLR's frame with labels: every view in the batch with the anchor's class is a positive, not
only the other view of the same image (L^sup_out, eq. 2). It is the supervised reference that
shares everything but the labels with the contrastive methods; the cross-entropy baseline is
`supervised`. After training the projector is discarded and the encoder evaluated (§3.1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.heads import mlp
from selfsup.losses import supervised_contrastive
from selfsup.methods.base import Method
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views


@METHODS.register("supcon")
class SupCon(Method):
    """SupCon: every same-class view of the (gathered) batch is a positive of the anchor."""

    uses_labels = True

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,  # projection size (§3.1: one hidden layer of 2048, output 128)
        hidden: int = 2048,  # one hidden layer, no batch norm (official resnet_big.py "mlp" head)
        temperature: float = 0.1,  # the paper's and the README's runs (the code's default: 0.07)
    ) -> None:
        check_method(dim=dim, hidden=hidden, temperature=temperature)
        super().__init__(backbone)
        self.projector = mlp(backbone.num_features, hidden, dim, norm=None)  # Linear-ReLU-Linear
        self.temperature = temperature

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        z = self.projector(torch.cat(self.encode([x1, x2])))
        z1, z2 = (views.global_batch.gather(z_v) for z_v in z.chunk(2))
        labels = views.global_batch.gather_nograd(views.labels)
        loss = supervised_contrastive(torch.cat([z1, z2]), labels.repeat(2), self.temperature)
        return {"loss": loss}
