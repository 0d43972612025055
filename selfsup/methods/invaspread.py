"""InvaSpread: invariant and spreading instance features (Ye et al. 2019, arXiv 1904.03436).

Two augmentations of each image pass through one encoder and a linear 128-d head; each view must
pick out its partner among all other views of the batch (invariance), and every other view must
not be classified as it (spreading). Like InstDisc (instdisc.py) it is instance discrimination,
but with the batch's own features instead of a memory bank, so there is no stale entry: the
direct ancestor of SimCLR (simclr.py), which differs in the MLP head and its plain softmax loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.decomposition import Term, invariant_spreading_parts
from selfsup.losses import invariant_spreading
from selfsup.methods.base import Method
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views


@METHODS.register("invaspread")
class InvaSpread(Method):
    """InvaSpread: linear head + the batch-wise invariant/spreading loss over both views."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,  # fc to 128-d, then L2 norm (the code's --low-dim, Normalize)
        temperature: float = 0.1,  # τ (the code's --batch-t)
        key_gradient: bool = False,  # True: gradient through both sides of each similarity
    ) -> None:
        check_method(dim=dim, temperature=temperature)
        super().__init__(backbone)
        self.projector = nn.Linear(backbone.num_features, dim)
        self.temperature, self.key_gradient = temperature, key_gradient

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        h1, h2 = self.encode([x1, x2])  # one BN batch over both views, as the code's cat
        z1, z2 = F.normalize(self.projector(torch.cat([h1, h2])), dim=1).chunk(2)
        gather = views.global_batch.gather  # the rows of every part of the global batch
        anchors = torch.cat([gather(z1), gather(z2)])  # (2N, dim): rows i, i + N one image
        # The official BatchCriterion uses x.t().data: only the anchor side of each similarity
        # carries gradient; the paper's formula has no such detach (key_gradient=True).
        keys = anchors if self.key_gradient else anchors.detach()
        loss = invariant_spreading(anchors, keys, self.temperature)
        with torch.no_grad():
            positive_similarity = (z1 * z2).sum(dim=1).mean()
        return {"loss": loss, "pos_sim": positive_similarity}

    def gradient_terms(self, views: Views) -> list[Term]:
        # The anchor side; with key_gradient the keys also receive gradient, not decomposed.
        x1, x2 = views.large[:2]
        anchors = F.normalize(self.projector(torch.cat(self.encode([x1, x2]))), dim=1)
        partner = torch.arange(len(anchors), device=anchors.device).roll(len(x1))
        parts = invariant_spreading_parts(anchors, anchors, self.temperature)
        return [("", parts, anchors[partner])]
