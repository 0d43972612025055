"""Statistics of sets of embeddings, pure functions of feature matrices: the spread of the
L2-normalised embeddings and their effective rank (which show collapse), the alignment and
uniformity of Wang & Isola 2020, the within-class variation, and two distances between feature
distributions (cosine distance of the means, kernel MMD). eval/analysis.py runs them on a run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.subsets import seeded_subset


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


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """L_align = E ||f(x) - f(x+)||^alpha over positive pairs, the rows of z1 and z2 (N, D),
    after L2 normalisation (Wang & Isola 2020, ICML, §4.1): 0 when the two views of an image
    map to the same direction, up to 2^alpha for opposite ones. Lower is better aligned."""
    if z1.shape != z2.shape:
        raise ValueError(
            f"alignment needs pairs: z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} differ"
        )
    a, b = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    return float((a - b).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2.0, chunk_size: int = 1024) -> float:
    """L_uniform = log E exp(-t ||f(x) - f(y)||^2) over the distinct pairs x != y of the
    L2-normalised rows of z (N, D) (Wang & Isola 2020, ICML, §4.1; the log of the mean Gaussian
    potential): -4t when the points are antipodal pairs, 0 when all coincide; lower is more
    uniform on the sphere. Exact, `chunk_size` rows at a time: memory O(chunk_size * N)."""
    if len(z) < 2:
        raise ValueError(f"uniformity needs at least 2 samples, got {len(z)}")
    z = F.normalize(z.double(), dim=1)
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    for start in range(0, len(z), chunk_size):
        rows = z[start : start + chunk_size]
        squared = (2 - 2 * rows @ z.T).clamp_min(0)  # ||a - b||^2 of unit vectors
        potential = torch.exp(-t * squared)
        own = torch.arange(len(rows), device=z.device)
        potential[own, start + own] = 0  # a sample is not a pair with itself
        total += potential.sum()
    return float((total / (len(z) * (len(z) - 1))).log())


def intra_class_variation(features: Tensor, labels: Tensor, relative: bool = False) -> float:
    """Within-class variation of the L2-normalised features z (N, D):

        V_within = (1/C) sum_c (1/N_c) sum_{i in c} ||z_i - mu_c||^2,   mu_c = class-c mean of z,

    every class weighted equally: 0 when each class maps to one point. With `relative`, divided
    by the inter-class spread V_between = (1/C) sum_c ||mu_c - mu||^2 (mu = mean of the class
    means): the trace ratio tr(Sigma_W) / tr(Sigma_B), a scale-free form of the within-class
    variability that Papyan, Han & Donoho 2020 (PNAS, "neural collapse", NC1) measure as
    tr(Sigma_W Sigma_B^+) / C; small when classes are tight clusters far apart."""
    z = F.normalize(features.double(), dim=1)
    members = [z[labels == c] for c in labels.unique()]
    means = torch.stack([m.mean(0) for m in members])
    within = torch.stack([(m - m.mean(0)).pow(2).sum(1).mean() for m in members]).mean()
    if not relative:
        return float(within)
    if len(members) < 2:
        raise ValueError(
            f"relative intra-class variation needs 2 or more classes, got {len(members)}"
        )
    between = (means - means.mean(0)).pow(2).sum(1).mean()
    return float(within / between)


def mean_cosine_distance(a: Tensor, b: Tensor) -> float:
    """1 - cos(mean(a), mean(b)) of two feature sets (N, D) and (M, D): 0 when their means point
    the same way, 2 when opposite; blind to everything but the first moment (use `mmd` too)."""
    return float(1 - F.cosine_similarity(a.double().mean(0), b.double().mean(0), dim=0))


def _subsample(x: Tensor, max_samples: int, seed: int) -> Tensor:
    """At most max_samples rows, chosen by a generator of its own: the same rows for equal sets."""
    if len(x) <= max_samples:
        return x
    return x[seeded_subset(len(x), max_samples, seed).to(x.device)]


def mmd(
    a: Tensor,
    b: Tensor,
    bandwidth: float | None = None,
    max_samples: int = 2000,
    seed: int = 0,
) -> float:
    """Squared maximum mean discrepancy of the sets X = a (m, D) and Y = b (n, D) with the
    Gaussian kernel k(x, y) = exp(-||x - y||^2 / (2 sigma^2)), the biased V-statistic

        MMD_b^2 = 1/m^2 sum_ij k(x_i, x_j) + 1/n^2 sum_ij k(y_i, y_j) - 2/(mn) sum_ij k(x_i, y_j)

    (Gretton et al. 2012, JMLR 13, eq. 5): >= 0, and exactly 0 for X = Y. `bandwidth` sigma
    None: the (lower) median of the non-zero distances between points of the pooled sample (the
    median heuristic, ibid. §8). Each set is first cut to at most `max_samples` random rows
    (seeded; the kernel matrices are (m + n)^2), and the sums run in float64."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"mmd needs two non-empty sets, got {len(a)} and {len(b)} samples")
    if bandwidth is not None and bandwidth <= 0:
        raise ValueError(f"mmd bandwidth must be positive, got {bandwidth}; or None (median)")
    x = _subsample(a.double(), max_samples, seed)
    y = _subsample(b.double(), max_samples, seed)
    if bandwidth is None:
        distances = torch.pdist(torch.cat([x, y]))
        distances = distances[distances > 0]
        if len(distances) == 0:
            return 0.0  # every point the same: the two samples are identical
        bandwidth = float(distances.median())

    def kernel(u: Tensor, v: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(u, v).pow(2) / (2 * bandwidth**2))

    value = kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()
    return max(float(value), 0.0)  # a squared norm: below 0 only by rounding
