"""Statistics of a set of embeddings that show collapse: the spread of the L2-normalised
embeddings and their effective rank. Pure functions of a feature matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalized_std(features: Tensor) -> float:
    """Mean over dimensions of the std over samples of the L2-normalised features (N, D), times
    sqrt(D): ~1 when the unit vectors spread evenly over the sphere, 0 when every sample maps
    to one vector (SimSiam, Chen & He 2021, §4.1 and Fig. 2, reads the unscaled std against
    1/sqrt(D); the factor makes one threshold fit every width)."""
    z = F.normalize(features.double(), dim=1)
    return float(z.std(dim=0).mean() * z.shape[1] ** 0.5)


def effective_rank(features: Tensor, eps: float = 1e-12) -> float:
    """exp of the entropy of the normalised singular values of the L2-normalised features (N, D)
    (RankMe, Garrido et al. 2023, arXiv 2210.02885, eq. 1): 1 when all samples lie on one line,
    up to min(N, D) when they fill every dimension equally."""
    z = F.normalize(features.double(), dim=1)
    singular = torch.linalg.svdvals(z)
    p = singular / singular.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
