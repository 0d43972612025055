"""BYOL: bootstrap your own latent (Grill et al. 2020, arXiv 2006.07733).

An online network (encoder, projector, predictor) regresses the projection that an EMA target
network (encoder, projector) gives for the other view; no negatives. The predictor and the slowly
moving target keep it from collapsing. The EMA momentum τ ramps from 0.996 to 1 on a cosine over
training (§3.2). Unlike MoCo (moco.py) there is no queue and no contrast; SimSiam (simsiam.py) is
this method without the EMA: its target is the online network itself behind a stop-gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.decomposition import Term, predictor_terms
from selfsup.heads import mlp
from selfsup.losses import regression
from selfsup.methods.base import Method
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.schedules import cosine_ramp
from selfsup.step import Progress, Views
from selfsup.target import EMA, TARGET_SETTINGS


@METHODS.register("byol")
class BYOL(Method):
    """BYOL: online network + predictor regress an EMA target's projection (2 - 2·cos)."""

    target_settings = TARGET_SETTINGS  # momentum: its own EMA, as published (target.py)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,  # projection size (§3.3)
        hidden: int = 4096,  # hidden width of projector and predictor (§3.3)
        momentum: float = 0.996,  # τ_base; τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2 (§3.2)
        final_momentum: float = 1.0,
    ) -> None:
        check_method(dim=dim, hidden=hidden)
        super().__init__(backbone)
        self.projector = mlp(backbone.num_features, hidden, dim)  # Linear-BN-ReLU-Linear
        self.predictor = mlp(dim, hidden, dim)
        self.target = EMA(self.backbone, self.projector)  # ξ ← τξ + (1 − τ)θ
        self.momentum, self.final_momentum = momentum, final_momentum

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        # Each view is its own BN batch, as in the paper's code.
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))  # (N, dim)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():  # the target is not trained by the loss, only by the EMA
            t1, t2 = self.target(x1), self.target(x2)
        loss = regression(p1, t2) + regression(p2, t1)  # L + L̃, symmetrised (eq. 2)
        with torch.no_grad():
            positive_similarity = F.cosine_similarity(p1, t2, dim=1).mean()
            z_std = F.normalize(z1, dim=1).std(dim=0).mean()  # ≈ 1/sqrt(dim), 0 on collapse
        return {"loss": loss, "pos_sim": positive_similarity, "z_std": z_std}

    def gradient_terms(self, views: Views) -> list[Term]:
        # at the prediction, and through the predictor at the projection (predictor_terms)
        x1, x2 = views.large[:2]
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))
        t1, t2 = self.target(x1), self.target(x2)
        return predictor_terms(self.predictor, [(z1, t2), (z2, t1)], weight=2.0)  # 2 − 2cos

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        tau = cosine_ramp(self.momentum, self.final_momentum, progress.fraction)
        self.target.update(tau)
