"""UniGrad: the unified gradient of Siamese self-supervised learning (Tao et al. 2022, arXiv
2112.05141, CVPR 2022).

Contrastive, asymmetric and decorrelation methods all push an online embedding u with a gradient
−u⁺ + λ·(a weighted sum of other samples); UniGrad takes the simplest such gradient,
∂L/∂u = −u⁺ + λ·F·u, where u⁺ is the other view's embedding from a momentum network and F a
moving average of the correlation matrix of the momentum embeddings. No memory bank, no
predictor, no negatives: F alone keeps the embeddings from crowding into a few directions. The
paper found the momentum target worth ~2 points in every family, and UniGrad keeps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.decomposition import Term, scaled, unigrad_parts
from selfsup.heads import mlp
from selfsup.losses import unigrad
from selfsup.methods.base import Method
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.schedules import cosine_ramp
from selfsup.step import Progress, Views
from selfsup.target import EMA, TARGET_SETTINGS


@METHODS.register("unigrad")
class UniGrad(Method):
    """UniGrad: −u⁺ + λ·F·u against a momentum target, F a moving feature correlation matrix."""

    target_settings = TARGET_SETTINGS  # momentum: its own EMA, as published (target.py)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 2048,  # projector output (official configs/unigrad.py: projector_output_dim)
        hidden: int = 2048,  # projector hidden width (ibid.)
        projector_layers: int = 3,  # Linear-BN-ReLU ×2, then Linear (official _projection_mlp)
        balance: float = 100.0,  # λ, the weight of the negative gradient (configs: lambd)
        correlation_momentum: float = 0.99,  # ρ of F's moving average (configs: rho)
        momentum: float = 0.996,  # momentum network, 0.996 → 1 on a cosine (configs: base_momentum)
        final_momentum: float = 1.0,
    ) -> None:
        check_method(
            dim=dim, hidden=hidden, balance=balance, correlation_momentum=correlation_momentum
        )
        super().__init__(backbone)
        self.projector = mlp(backbone.num_features, hidden, dim, layers=projector_layers)
        self.target = EMA(self.backbone, self.projector)
        self.balance, self.correlation_momentum = balance, correlation_momentum
        self.momentum, self.final_momentum = momentum, final_momentum
        # F and whether it holds a first batch yet (the code starts it at the first batch's matrix)
        self.register_buffer("correlation", torch.zeros(dim, dim))
        self.register_buffer("correlation_started", torch.zeros((), dtype=torch.bool))

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        u1, u2 = (F.normalize(self.projector(self.backbone(x)), dim=1) for x in (x1, x2))
        with torch.no_grad():
            t1, t2 = (F.normalize(self.target(x), dim=1) for x in (x1, x2))
            # both views of the global batch
            targets = views.global_batch.gather_nograd(torch.cat([t1, t2]))
            batch = targets.T @ targets / targets.shape[0]  # (dim, dim), mean of v vᵀ
            rho = self.correlation_momentum if bool(self.correlation_started) else 0.0
            correlation = rho * self.correlation + (1 - rho) * batch  # F with this batch in it
        loss = 0.5 * (
            unigrad(u1, t2, correlation, self.balance) + unigrad(u2, t1, correlation, self.balance)
        )
        with torch.no_grad():
            positive_similarity = 0.5 * ((u1 * t2).sum(dim=1) + (u2 * t1).sum(dim=1)).mean()
        # (1, dim, dim): one row per process, as every tensor a forward returns (Method.forward)
        return {"loss": loss, "pos_sim": positive_similarity, "correlation": correlation[None]}

    def gradient_terms(self, views: Views) -> list[Term]:
        # its own split, −u⁺ + λ·F·u; F of this process's batch (forward gathers every process's)
        x1, x2 = views.large[:2]
        u1, u2 = (F.normalize(self.projector(self.backbone(x)), dim=1) for x in (x1, x2))
        t1, t2 = (F.normalize(self.target(x), dim=1) for x in (x1, x2))
        targets = torch.cat([t1, t2])
        batch = targets.T @ targets / targets.shape[0]
        rho = self.correlation_momentum if bool(self.correlation_started) else 0.0
        correlation = rho * self.correlation + (1 - rho) * batch  # F as the step that saw it
        # the loss is ½ (unigrad(u1, t2) + unigrad(u2, t1))
        return [
            ("", scaled(unigrad_parts(u, t, correlation, self.balance), 0.5), t)
            for u, t in ((u1, t2), (u2, t1))
        ]

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        self.correlation.copy_(out["correlation"][-1])  # the same F on every process
        self.correlation_started.fill_(True)
        self.target.update(cosine_ramp(self.momentum, self.final_momentum, progress.fraction))
