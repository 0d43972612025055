"""SimSiam: exploring simple Siamese representation learning (Chen & He 2021, arXiv 2011.10566).

One shared encoder and projector see both views; a bottleneck predictor maps one view's projection
to the other's, which is held fixed by a stop-gradient. Without the stop-gradient the output
collapses to a constant (§4.1); no negatives, no large batch and no momentum encoder are needed.
It is BYOL (byol.py) without the EMA: the target is the online projection itself, detached;
train.target=momentum gives it BYOL's momentum network instead (target.py, UniGrad Table 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.decomposition import Term, predictor_terms
from selfsup.heads import mlp
from selfsup.losses import negative_cosine
from selfsup.methods.base import Method
from selfsup.params import Group, check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views
from selfsup.target import TARGET_SETTINGS, SiameseTarget


@METHODS.register("simsiam")
class SimSiam(Method):
    """SimSiam: shared encoder, predictor and stop-gradient; symmetrised negative cosine."""

    target_settings = TARGET_SETTINGS

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 2048,  # projection size (§3, "Projection MLP")
        hidden: int = 2048,  # projector hidden width
        projector_layers: int = 3,  # the paper's CIFAR-10 runs use 2 (App. D)
        predictor_hidden: int = 512,  # the predictor's bottleneck (§3, "Prediction MLP")
        fixed_predictor_lr: bool = True,  # predictor at the base lr, no lr decay (§4.4, Table 1)
    ) -> None:
        check_method(dim=dim, hidden=hidden, predictor_hidden=predictor_hidden)
        super().__init__(backbone)
        # BN on every layer including the output fc (no ReLU there); the last BN has no affine
        # parameters, and no bias precedes a BN, as in the paper's code.
        self.projector = mlp(
            backbone.num_features, hidden, dim, layers=projector_layers, last_norm="bn_noaffine"
        )
        self.predictor = mlp(dim, predictor_hidden, dim)  # Linear-BN-ReLU-Linear
        self.fixed_predictor_lr = fixed_predictor_lr
        # the target side: as published, or as train.target sets it (target.py)
        self.target_branch = SiameseTarget(self.backbone, self.projector, paper="stop_gradient")

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))  # (N, dim)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # L = ½D(p1, t2) + ½D(p2, t1), eq. 2 with t = stopgrad(z): the stop-gradient is the
        # method. train.target=momentum: t is a momentum network's projection instead.
        t1, t2 = self.target_branch(x1, z1), self.target_branch(x2, z2)
        loss = 0.5 * negative_cosine(p1, t2) + 0.5 * negative_cosine(p2, t1)
        with torch.no_grad():
            positive_similarity = F.cosine_similarity(p1, t2, dim=1).mean()
            z_std = F.normalize(z1, dim=1).std(dim=0).mean()  # ≈ 1/sqrt(dim); 0: collapse (Fig. 2)
        return {"loss": loss, "pos_sim": positive_similarity, "z_std": z_std}

    def gradient_terms(self, views: Views) -> list[Term]:
        # at the prediction, and through the predictor at the projection (predictor_terms)
        x1, x2 = views.large[:2]
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))
        t1, t2 = self.target_branch(x1, z1).detach(), self.target_branch(x2, z2).detach()
        return predictor_terms(self.predictor, [(z1, t2), (z2, t1)], weight=0.5)  # ½·(−cos)

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        self.target_branch.update(progress.fraction)

    def parameter_groups(self) -> dict[str, Group]:
        # The predictor at the base lr, undecayed by the schedule (§4.4, Table 1).
        return {"predictor": Group(fixed_lr=True)} if self.fixed_predictor_lr else {}
