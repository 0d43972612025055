"""MoCo v3: momentum contrast without a queue, for ViTs (Chen, Xie & He 2021, arXiv 2104.02057).

Each view's query (backbone, projector, predictor) must pick out the other view's key, computed by
a momentum encoder (EMA of backbone and projector, not the predictor), among the keys of the whole
batch: symmetrised InfoNCE ctr(q1, k2) + ctr(q2, k1), scaled by 2τ (§3, Algorithm 1). Unlike MoCo
v1/v2 (moco.py) the negatives are the batch's other keys, not a queue; unlike BYOL (byol.py) the
loss contrasts. For ViTs the patch projection may stay at its random initialisation, which the
paper found to stabilise training (§4.2): the ViT backbone's `freeze_patch_embed` (the recipes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.decomposition import Term, info_nce_parts, scaled
from selfsup.heads import mlp
from selfsup.losses import moco_v3_contrast
from selfsup.methods.base import Method
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.schedules import cosine_ramp
from selfsup.step import Progress, Views
from selfsup.target import EMA, TARGET_SETTINGS


@METHODS.register("moco_v3")
class MoCoV3(Method):
    """MoCo v3: query + predictor vs momentum keys of the (gathered) batch, symmetrised InfoNCE."""

    target_settings = TARGET_SETTINGS  # momentum: its own EMA, as published (target.py)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,  # output of projector and predictor (§5 "MLP heads")
        hidden: int = 4096,  # hidden width of both heads (§5)
        projector_layers: int = 3,  # ViT; ResNet-50: 2 (official code: MoCo_ViT / MoCo_ResNet)
        predictor_last_bn: bool = True,  # ViT; the code's ResNet predictor has no output BN
        momentum: float = 0.99,  # m_0; m = 1 − (1 − m_0)(cos(πk/K) + 1)/2 (code --moco-m-cos)
        final_momentum: float = 1.0,
        temperature: float = 0.2,  # τ for ViT (§5); the code's ResNet-50 recipes use 1.0
    ) -> None:
        check_method(
            dim=dim, hidden=hidden, projector_layers=projector_layers, temperature=temperature,
            momentum=momentum, final_momentum=final_momentum,
        )  # fmt: skip
        super().__init__(backbone)
        # BN on every layer, the output ones too, without affine parameters there, and no bias
        # before a BN, as in the code's _build_mlp(last_bn=True).
        self.projector = mlp(
            backbone.num_features, hidden, dim, layers=projector_layers, last_norm="bn_noaffine"
        )
        last_norm = "bn_noaffine" if predictor_last_bn else None  # ResNet: a Linear, no bias
        self.predictor = mlp(dim, hidden, dim, last_norm=last_norm, last_bias=False)
        self.target = EMA(self.backbone, self.projector)  # the momentum encoder: no predictor (§3)
        self.momentum, self.final_momentum = momentum, final_momentum
        self.temperature = temperature

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        # Each view is its own BN batch, as in the paper's code.
        q1, q2 = (self.predictor(self.projector(self.backbone(x))) for x in (x1, x2))  # (N, dim)
        with torch.no_grad():  # keys carry no gradient; the batch's keys of every process
            k1, k2 = (views.global_batch.gather_nograd(self.target(x)) for x in (x1, x2))
        offset = views.global_batch.rank * len(x1)  # our positives among the (parts·N) keys
        tau = self.temperature  # ctr(q1, k2) + ctr(q2, k1), symmetrised (Algorithm 1)
        loss = moco_v3_contrast(q1, k2, tau, offset) + moco_v3_contrast(q2, k1, tau, offset)
        with torch.no_grad():
            own = k2[offset : offset + len(x1)]
            positive_similarity = F.cosine_similarity(q1, own, dim=1).mean()
            z_std = F.normalize(q1, dim=1).std(dim=0).mean()  # ≈ 1/sqrt(dim), 0 on collapse
        return {"loss": loss, "pos_sim": positive_similarity, "z_std": z_std}

    def gradient_terms(self, views: Views) -> list[Term]:
        x1, x2 = views.large[:2]
        q1, q2 = (self.predictor(self.projector(self.backbone(x))) for x in (x1, x2))
        k1, k2 = self.target(x1), self.target(x2)
        tau, terms = self.temperature, []
        # ctr(q1, k2) + ctr(q2, k1), each 2τ times the InfoNCE of unit vectors
        for q, k in ((q1, k2), (q2, k1)):
            u, c = F.normalize(q, dim=1), F.normalize(k, dim=1)
            parts = info_nce_parts(u, c, torch.arange(len(u), device=u.device), tau)
            terms.append(("", scaled(parts, 2 * tau), c))
        return terms

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        # m from m_0 to 1 on a half cosine over training (code: adjust_moco_momentum)
        self.target.update(cosine_ramp(self.momentum, self.final_momentum, progress.fraction))
