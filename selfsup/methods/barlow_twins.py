"""Barlow Twins: self-supervised learning via redundancy reduction (Zbontar et al. 2021, arXiv
2103.03230).

Two views of each image pass through one shared encoder and a 3-layer projector. The
cross-correlation matrix C between the two views' embeddings, each standardised over the batch,
is pushed towards the identity (eq. 1): its diagonal to 1, so each dimension is invariant to the
distortions, its off-diagonal to 0, so no two dimensions carry the same information. No
negatives, predictor, EMA target or stop-gradient (§2). C is a statistic of the whole batch: the
official code all-reduces it over the GPUs; here the embeddings of every process are gathered with
their gradient (`dist.gather`) and C is computed on the global batch, as SimCLR's NT-Xent is.
VICReg (vicreg.py) regularises each view's covariance instead of the cross-correlation.
Multi-crop (SwAV's, Caron et al. 2020 §3.2; not in the paper): with small views (`views.small`,
e.g. the `dino` view set) each small view's embedding is correlated with each of the two global
views' and the loss is the mean of L over the 1 + 2·n pairs, so n = 0 is eq. 1 itself.
train.target=stop_gradient or momentum gives it a target side, ½[L(C(z1, t2)) + L(C(t1, z2))]
with t detached or from a momentum network (target.py; UniGrad, arXiv 2112.05141, Table 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.decomposition import Term, barlow_twins_parts, pair_weight, scaled
from selfsup.heads import mlp
from selfsup.losses import barlow_twins, cross_correlation
from selfsup.methods.base import Method
from selfsup.params import AT_LEAST_ONE, check_limits, check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views
from selfsup.target import TARGET_SETTINGS, SiameseTarget


@METHODS.register("barlow_twins")
class BarlowTwins(Method):
    """Barlow Twins: shared encoder + projector; cross-correlation of the views towards I."""

    target_settings = TARGET_SETTINGS
    uses_small_views = True  # multi-crop (module docstring)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 8192,  # projector output ("Implementation details"; code --projector)
        hidden: int = 8192,  # projector hidden width (code 8192-8192-8192)
        layers: int = 3,  # linear layers of the projector ("Implementation details")
        off_diagonal_weight: float = 0.0051,  # λ (eq. 1); code --lambd (the paper's text: 5e-3)
        # the loss times this: 1 as published; solo-learn's recipes use 0.1 (`scale_loss`), which
        # scales the steps of the norms and biases that LARS leaves unadapted
        loss_scale: float = 1.0,
    ) -> None:
        check_method(
            dim=dim, hidden=hidden, off_diagonal_weight=off_diagonal_weight, loss_scale=loss_scale
        )
        # a projector of at least one layer (SimCLR's layers=0: none at all)
        check_limits("method", {"layers": layers}, {"layers": AT_LEAST_ONE})
        super().__init__(backbone)
        # Linear-BN-ReLU on the hidden layers, a last Linear; no biases anywhere (the code's).
        self.projector = mlp(backbone.num_features, hidden, dim, layers=layers, last_bias=False)
        self.off_diagonal_weight = off_diagonal_weight
        self.loss_scale = loss_scale
        # the target side: as published, or as train.target sets it (target.py)
        self.target_branch = SiameseTarget(self.backbone, self.projector, paper="online")

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        # Each view is its own BN batch, as in the paper's code.
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))  # (N, dim)
        # (dim, dim) each, over the global batch: C(z1, z2) as published; with a target branch
        # C(z1, t2) and C(t1, z2), the loss their mean ½[L(C(z1, t2)) + L(C(t1, z2))]
        pairs = self.target_branch.pairs((x1, x2), (z1, z2))
        if views.small:  # multi-crop: each small view against each global view's target side
            targets = [self.target_branch(x, z) for x, z in ((x1, z1), (x2, z2))]
            small = [self.projector(self.backbone(x)) for x in views.small]
            pairs += [(s, t) for s in small for t in targets]
        gather = views.global_batch.gather
        correlations = [cross_correlation(gather(a), gather(b)) for a, b in pairs]
        losses = [barlow_twins(c, self.off_diagonal_weight) for c in correlations]
        loss = self.loss_scale * torch.stack(losses).mean()
        with torch.no_grad():
            correlation = correlations[0]
            diagonal = correlation.diagonal()
            d = len(diagonal)
            off_squares = (correlation.square().sum() - diagonal.square().sum()).clamp(min=0)
            off_diagonal = (off_squares / max(d * (d - 1), 1)).sqrt()  # RMS of C_ij, i ≠ j
            z_std = F.normalize(z1, dim=1).std(dim=0).mean()  # ≈ 1/sqrt(dim), 0 on collapse
        return {
            "loss": loss,
            "on_diag": diagonal.mean(),  # → 1: the views agree dimension by dimension
            "off_diag": off_diagonal,  # → 0: the dimensions are decorrelated
            "z_std": z_std,
        }

    def gradient_terms(self, views: Views) -> list[Term]:
        # on the standardised embeddings; with a target branch each view gets half of its term;
        # the two global views' term only (a multi-crop run's small views are left out)
        x1, x2 = views.large[:2]
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))
        s1, s2 = _standardised(z1), _standardised(z2)
        t1 = _standardised(self.target_branch(x1, z1).detach())
        t2 = _standardised(self.target_branch(x2, z2).detach())
        weight = self.off_diagonal_weight
        half = pair_weight(self.target_branch) * self.loss_scale
        return [
            ("", scaled(barlow_twins_parts(s1, t2, weight), half), t2),
            ("", scaled(barlow_twins_parts(s2, t1, weight), half), t1),
        ]

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        self.target_branch.update(progress.fraction)


def _standardised(z: Tensor, eps: float = 1e-5) -> Tensor:
    """ẑ as `losses.cross_correlation` standardises each view (biased variance, eps inside), in
    z's own precision."""
    return (z - z.mean(dim=0)) / (z.var(dim=0, correction=0) + eps).sqrt()
