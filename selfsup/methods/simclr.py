"""SimCLR v1/v2: a simple framework for contrastive learning (Chen et al. 2020, arXiv 2002.05709;
v2: arXiv 2006.10029).

Two augmented views of each image pass through one shared encoder and an MLP projector; NT-Xent
asks each view to find its partner among the other 2N - 1 views of the (gathered) batch. v1 and v2
differ only in numbers: v2 uses a 3-layer projector (layers=3) and a bigger encoder (recipes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.dist import gather
from selfsup.heads import mlp
from selfsup.losses import nt_xent
from selfsup.methods.base import Method
from selfsup.params import require_positive
from selfsup.registry import METHODS
from selfsup.step import Progress, Views


@METHODS.register("simclr")
class SimCLR(Method):
    """SimCLR: shared encoder + MLP projector + NT-Xent over the 2N views of the batch."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        hidden: int = 2048,
        layers: int = 2,  # v2: 3
        temperature: float = 0.1,  # ImageNet, batch 4096 (paper Table 5); CIFAR-10 uses 0.5
    ) -> None:
        require_positive(dim=dim, hidden=hidden, temperature=temperature)
        super().__init__(backbone)
        self.projector = mlp(backbone.num_features, hidden, dim, layers=layers)
        self.temperature = temperature

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        h1, h2 = self.encode([x1, x2])
        z1, z2 = self.projector(torch.cat([h1, h2])).chunk(2)  # one BN batch over both views
        loss = nt_xent(gather(z1), gather(z2), self.temperature)
        with torch.no_grad():
            positive_similarity = F.cosine_similarity(z1, z2, dim=1).mean()
        return {"loss": loss, "pos_sim": positive_similarity}
