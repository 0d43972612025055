"""VICReg: variance-invariance-covariance regularisation (Bardes, Ponce & LeCun 2022, arXiv
2105.04906).

Two views of each image pass through one shared encoder and a 3-layer projector ("expander").
The loss has three terms (eq. 6): invariance, the mean squared distance between the two views'
embeddings; variance, a hinge that keeps the standard deviation of every embedding dimension
above γ = 1 over the batch, so the embeddings cannot collapse to a point; covariance, the squared
off-diagonal covariances, which decorrelate the dimensions so they cannot collapse to a line
(§3). Variance and covariance are regularisers of each branch on its own; no negatives,
predictor, EMA target or stop-gradient. The statistics are over the global batch: the embeddings
of every process are gathered with their gradient (`dist.gather`), as the official code does.
Barlow Twins (barlow_twins.py) instead standardises the embeddings and decorrelates across views.
train.target=stop_gradient or momentum gives it a target side: each term averaged over the pairs
(z1, t2) and (t1, z2), t detached or from a momentum network (target.py; UniGrad Table 2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.decomposition import Term, pair_weight, scaled, vicreg_parts
from selfsup.heads import mlp
from selfsup.losses import vicreg_terms
from selfsup.methods.base import Method
from selfsup.params import AT_LEAST_ONE, check_limits, check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views
from selfsup.target import TARGET_SETTINGS, SiameseTarget


@METHODS.register("vicreg")
class VICReg(Method):
    """VICReg: shared encoder + expander; invariance + variance hinge + covariance penalty."""

    target_settings = TARGET_SETTINGS

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 8192,  # expander output ("Implementation details"; code --mlp 8192-8192-8192)
        hidden: int = 8192,  # expander hidden width (code --mlp)
        layers: int = 3,  # linear layers of the expander ("Implementation details")
        invariance_weight: float = 25.0,  # λ (eq. 6; code --sim-coeff)
        variance_weight: float = 25.0,  # μ (eq. 6; code --std-coeff)
        covariance_weight: float = 1.0,  # ν (eq. 6; code --cov-coeff)
        std_target: float = 1.0,  # γ, the hinge's target standard deviation (eq. 1)
        eps: float = 1e-4,  # ε in S(x, ε) = sqrt(Var(x) + ε) (eq. 2; code 0.0001)
    ) -> None:
        check_method(
            dim=dim, hidden=hidden, eps=eps, invariance_weight=invariance_weight,
            variance_weight=variance_weight, covariance_weight=covariance_weight,
            std_target=std_target,
        )  # fmt: skip
        # an expander of at least one layer (SimCLR's layers=0: no head at all)
        check_limits("method", {"layers": layers}, {"layers": AT_LEAST_ONE})
        super().__init__(backbone)
        # Linear-BN-ReLU on the hidden layers, then a Linear: the code's Projector, whose hidden
        # Linears keep their bias before the BN and whose last one has none.
        self.projector = mlp(
            backbone.num_features, hidden, dim, layers=layers, bias_before_norm=True,
            last_bias=False,
        )  # fmt: skip
        self.invariance_weight, self.variance_weight = invariance_weight, variance_weight
        self.covariance_weight = covariance_weight
        self.std_target, self.eps = std_target, eps
        # the target side: as published, or as train.target sets it (target.py)
        self.target_branch = SiameseTarget(self.backbone, self.projector, paper="online")

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        # Each view is its own BN batch, as in the paper's code.
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))  # (N, dim)
        # (world·N, dim) each: the statistics of the global batch. The pair (z1, z2) as published;
        # with a target branch the terms are averaged over (z1, t2) and (t1, z2).
        gather = views.global_batch.gather
        pairs = [(gather(a), gather(b)) for a, b in self.target_branch.pairs((x1, x2), (z1, z2))]
        terms = zip(*(vicreg_terms(a, b, self.std_target, self.eps) for a, b in pairs), strict=True)
        invariance, variance, covariance = (torch.stack(term).mean() for term in terms)
        loss = (
            self.invariance_weight * invariance
            + self.variance_weight * variance
            + self.covariance_weight * covariance
        )  # λ s + μ v + ν c (eq. 6)
        with torch.no_grad():
            z_std = pairs[0][0].std(dim=0).mean()  # z1's: held >= γ by the variance term
        return {
            "loss": loss,
            "invariance": invariance.detach(),
            "variance": variance.detach(),
            "covariance": covariance.detach(),
            "z_std": z_std,
        }

    def gradient_terms(self, views: Views) -> list[Term]:
        # split by term of eq. 6; with a target branch each view gets half of its pair's term
        x1, x2 = views.large[:2]
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))
        weights = (self.invariance_weight, self.variance_weight, self.covariance_weight)
        settings = (self.std_target, self.eps)
        t1, t2 = self.target_branch(x1, z1).detach(), self.target_branch(x2, z2).detach()
        half = pair_weight(self.target_branch)
        return [
            ("", scaled(vicreg_parts(z1, t2, *weights, *settings), half), t2),
            ("", scaled(vicreg_parts(z2, t1, *weights, *settings), half), t1),
        ]

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        self.target_branch.update(progress.fraction)
