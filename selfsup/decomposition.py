"""The gradient of a Siamese self-supervised loss, split as in the unified gradient framework of
Tao et al. 2022 ("Exploring the Equivalence of Siamese Self-Supervised Learning via A Unified
Gradient Framework", arXiv 2112.05141, CVPR 2022).

The paper's claim: contrastive (MoCo, SimCLR), asymmetric (BYOL, SimSiam) and decorrelation
(Barlow Twins, VICReg) losses all push the online embedding u of a view with

    ∂L/∂u = −v⁺ + λ·(negative gradient)

where v⁺ is the other view's (target) embedding, the positive gradient, and the negative
gradient is a weighted mean of other samples' embeddings (contrastive: the softmax-weighted
negatives) or a correlation-matrix term F·u (decorrelation; UniGrad uses −v⁺ + λ·F·u itself).

Here each loss of `selfsup.losses` gets a pure function that returns the parts of its exact
gradient with respect to u, the targets held constant (the target branch's gradient stopped, as
the paper analyses every family), each part's closed form derived in its docstring; the parts sum
to autograd's gradient of the library's own loss (tests/eval/test_gradients.py). `gradient_scalars`
condenses them into the effective balance and the angles. Each method that has a decomposition
says how in its own file, as the hook `Method.gradient_terms`: it takes u and the targets from its
own modules as its `forward` does and calls these functions; `decompose` runs that hook on a batch
of views. eval/gradients.py runs it on a trained run's checkpoint, the engine every
train.gradients_every steps of training.

Scale: every part is of ∂L/∂u for the batch loss as the method weighs it; the scalars report
norms of N·∂L/∂u_n (N: the rows of the loss's batch mean), the gradient sample n's own term sends,
so they do not shrink with the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.step import Views
from selfsup.target import SiameseTarget

Parts = dict[str, Tensor]  # name -> (N, D) part of ∂L/∂u; "positive" is always one of them
Term = tuple[str, Parts, Tensor]  # (prefix of the scalars' names, parts, the targets v⁺ (N, D))


class Decomposable(Protocol):
    """A method with a gradient decomposition (`Method.gradient_terms`)."""

    def gradient_terms(self, views: Views) -> list[Term]: ...


def info_nce_probabilities(
    query: Tensor, candidates: Tensor, temperature: float, exclude: Tensor | None = None
) -> Tensor:
    """p_mk = softmax_k(u_m·c_k/τ) over the candidates in query m's denominator, (M, P); 0 where
    `exclude` (M, P) is True (SimCLR: the anchor itself; MoCo: the other queries' keys)."""
    logits = query @ candidates.T / temperature  # (M, P)
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return logits.softmax(dim=1)


def info_nce_parts(
    query: Tensor,
    candidates: Tensor,
    positives: Tensor,
    temperature: float,
    exclude: Tensor | None = None,
) -> Parts:
    """Positive and negative gradient of InfoNCE with constant candidates: SimCLR's NT-Xent, MoCo's
    and MoCo v3's losses with the key side's gradient stopped (Tao et al. 2022, the contrastive
    family's gradient).

    query u (M, D); candidates c (P, D), constants; positives (M,): the index of query m's positive
    c⁺ among them; exclude (M, P): candidates not in query m's softmax. With p = softmax(u_m·c/τ),
        L = −1/M Σ_m log p_m+,   ∂(−log p_m+)/∂u_m = (1/τ)(Σ_k p_mk c_k − c⁺)
    since ∂ log-sum-exp/∂u_m = Σ_k p_mk c_k/τ. Hence, the positive's own weight taken into it:
        positive = −(1 − p_m+)·c⁺ / (Mτ)
        negative = Σ_{k≠+} p_mk c_k / (Mτ) = λ·n̄_m,   λ = (1 − p_m+)/(Mτ)
    with n̄_m the p-weighted mean of the negatives (their weights sum to 1 − p_m+).
    """
    p = info_nce_probabilities(query, candidates, temperature, exclude)
    scale = 1.0 / (query.shape[0] * temperature)
    positive_p = p.gather(1, positives[:, None])  # (M, 1)
    negative_p = p.scatter(1, positives[:, None], 0.0)  # (M, P): the positive's column zeroed
    return {
        "positive": -(1 - positive_p) * candidates[positives] * scale,
        "negative": negative_p @ candidates * scale,
    }


def invariant_spreading_parts(anchors: Tensor, keys: Tensor, temperature: float) -> Parts:
    """Positive and negative gradient of InvaSpread's loss (`losses.invariant_spreading`, Ye et al.
    2019) with respect to the anchors, the keys constant (the official code's detached keys).

    anchors x (2N, D), keys k (2N, D): rows a and a ± N one image; a's softmax runs over b ≠ a,
    P_ab = softmax_b(x_a·k_b/τ), k̄_a = Σ_{b≠a} P_ab k_b, and b ∈ Neg(a) are b ∉ {a, a⁺}:
        J = −1/(2N) Σ_a [log P_aa⁺ + Σ_{b∈Neg(a)} log(1 − P_ab)]
        ∂ log P_ab/∂x_a = (k_b − k̄_a)/τ,   ∂ log(1 − P_ab)/∂x_a = −w_ab (k_b − k̄_a)/τ
    with w_ab = P_ab/(1 − P_ab), W_a = Σ_{b∈Neg(a)} w_ab, so
        ∂J/∂x_a = 1/(2Nτ) [−k⁺ + (1 − W_a) k̄_a + Σ_{b∈Neg(a)} w_ab k_b]
    Collecting the coefficients of k⁺ and of each negative k_b:
        positive = (−1 + (1 − W_a) P_aa⁺) k⁺ / (2Nτ)
        negative = Σ_{b∈Neg(a)} ((1 − W_a) P_ab + w_ab) k_b / (2Nτ)
    """
    n2 = anchors.shape[0]
    self_mask = torch.eye(n2, dtype=torch.bool, device=anchors.device)
    p = (anchors @ keys.T / temperature).masked_fill(self_mask, float("-inf")).softmax(dim=1)
    partner = torch.arange(n2, device=anchors.device).roll(n2 // 2)  # a <-> a + N
    negative_mask = ~(self_mask | F.one_hot(partner, n2).bool())
    w = torch.where(negative_mask, p / (1 - p), torch.zeros_like(p))  # w_ab on Neg(a) only
    spread = 1 - w.sum(dim=1, keepdim=True)  # 1 − W_a, (2N, 1)
    scale = 1.0 / (n2 * temperature)
    positive_p = p.gather(1, partner[:, None])
    negative_weights = torch.where(negative_mask, spread * p + w, torch.zeros_like(p))
    return {
        "positive": (spread * positive_p - 1) * keys[partner] * scale,
        "negative": negative_weights @ keys * scale,
    }


def barlow_twins_parts(z1: Tensor, z2: Tensor, off_diagonal_weight: float) -> Parts:
    """Positive and correlation-matrix (negative) gradient of Barlow Twins' loss
    (`losses.barlow_twins`, Zbontar et al. 2021, eq. 1) with respect to the standardised
    embeddings ẑ1 (N, D), ẑ2 (N, D) constant (Tao et al. 2022, the decorrelation family).

    C = ẑ1ᵀẑ2/N, L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij², ∂C_ij/∂ẑ1_ni = ẑ2_nj/N, so
        ∂L/∂ẑ1_ni = 1/N Σ_j ∂L/∂C_ij ẑ2_nj = (2/N)[−(1 − C_ii) ẑ2_ni + λ Σ_{j≠i} C_ij ẑ2_nj]
        positive = −(2/N) A ẑ2_n,  A = diag(1 − C_ii)
        negative = (2λ/N) C_off ẑ2_n = (2λ/N²) Σ_m (ẑ2_m·ẑ2_n) ẑ1_m − its diagonal
    the negative a sum of the batch's online embeddings ẑ1_m weighted by how much their targets
    resemble ẑ2_n: the paper's λ Σ_v (u2ᵀv2/N) v1.
    """
    n = z1.shape[0]
    c = z1.T @ z2 / n  # (D, D)
    off_diagonal = c - torch.diag_embed(c.diagonal())
    return {
        "positive": -(2 / n) * (1 - c.diagonal()) * z2,
        "negative": (2 * off_diagonal_weight / n) * z2 @ off_diagonal.T,
    }


def vicreg_parts(
    z1: Tensor,
    z2: Tensor,
    invariance_weight: float,
    variance_weight: float,
    covariance_weight: float,
    std_target: float = 1.0,
    eps: float = 1e-4,
) -> Parts:
    """VICReg's gradient (`losses.vicreg_terms`, L = λs + μv + νc, Bardes et al. 2022, eq. 6) with
    respect to z1 (N, D), z2 (N, D) constant, split by term.

    Invariance, s = 1/(ND) Σ_n ||z1_n − z2_n||²: ∂(λs)/∂z1_n = (2λ/(ND))(z1_n − z2_n), i.e.
        positive = −(2λ/(ND)) z2_n,   self = (2λ/(ND)) z1_n
    Variance, v = (v(Z1) + v(Z2))/2, v(Z) = 1/D Σ_j max(0, γ − S_j), S_j = sqrt(Var_j + ε) with
    the unbiased Var_j and ∂S_j/∂z_nj = (z_nj − z̄_j)/((N − 1) S_j):
        variance_nj = −μ/(2D) · [S_j < γ] · (z_nj − z̄_j)/((N − 1) S_j)
    Covariance, c(Z) = 1/D Σ_{i≠j} K_ij², K = Z̃ᵀZ̃/(N − 1) (Z̃ centred): dc = tr(G dK),
    G = 2K_off/D, so ∂c/∂Z̃ = 2Z̃G/(N − 1), whose columns already sum to 0 (centring passes it):
        covariance = (4ν/(D(N − 1))) K_off z̃_n
    the decorrelation family's correlation-matrix term (a λ·F·u with F = K_off).
    """
    n, d = z1.shape
    centred = z1 - z1.mean(dim=0)
    std = (z1.var(dim=0) + eps).sqrt()  # (D,), unbiased as the loss
    hinge = (std < std_target).to(z1.dtype)
    covariance = centred.T @ centred / (n - 1)
    off_diagonal = covariance - torch.diag_embed(covariance.diagonal())
    return {
        "positive": -(2 * invariance_weight / (n * d)) * z2,
        "self": (2 * invariance_weight / (n * d)) * z1,
        "variance": -(variance_weight / (2 * d)) * hinge * centred / ((n - 1) * std),
        "covariance": (4 * covariance_weight / (d * (n - 1))) * centred @ off_diagonal,
    }


def cosine_parts(prediction: Tensor, target: Tensor) -> Parts:
    """Positive and radial gradient of SimSiam's D(p, z) = −1/N Σ_n cos(p_n, z_n)
    (`losses.negative_cosine`) with respect to the prediction p (N, D), the target z constant.
    BYOL's `losses.regression`, 2 − 2·cos, has twice this gradient.

    ∂cos(p, z)/∂p = (ẑ − (p̂·ẑ) p̂)/|p|, so
        positive = −ẑ_n / (N|p_n|),   radial = (p̂_n·ẑ_n) p̂_n / (N|p_n|)
    The radial part only cancels the positive's component along p (the loss ignores |p|). At p
    there is no negative gradient: in this family it arises through the predictor, whose weights
    the paper relates to the correlation of the features (Tao et al. 2022, the asymmetric family;
    with a linear predictor W_p, ∂L/∂u = W_pᵀ ∂L/∂p); `gradient_decomposition` also reports the
    parts carried back to the projector output through the predictor's Jacobian.
    """
    norm = prediction.norm(dim=1, keepdim=True)  # |p|, (N, 1)
    p_hat, z_hat = prediction / norm, F.normalize(target, dim=1)
    scale = 1.0 / (prediction.shape[0] * norm)
    return {
        "positive": -z_hat * scale,
        "radial": (p_hat * z_hat).sum(dim=1, keepdim=True) * p_hat * scale,
    }


def unigrad_parts(online: Tensor, target: Tensor, correlation: Tensor, balance: float) -> Parts:
    """UniGrad's own split (`losses.unigrad`, Tao et al. 2022): online u (N, D), target u⁺ (N, D)
    and F (D, D) constant, L = 1/N Σ_n (−u_n·u⁺_n + λ/2 u_nᵀ F u_n), so
        positive = −u⁺_n / N,   negative = λ (F + Fᵀ)/2 u_n / N  (= λ F u_n / N, F symmetric)
    """
    n = online.shape[0]
    return {
        "positive": -target / n,
        "negative": balance * online @ (correlation + correlation.T) / (2 * n),
    }


def gradient_scalars(parts: Parts, target: Tensor) -> dict[str, float]:
    """The decomposition of one loss term in numbers, means over its N rows.

    g = Σ parts (∂L/∂u), g⁺ = parts["positive"], g⁻ = g − g⁺ (every other part: the negative
    gradient in the paper's −v⁺ + λ·(negative) reading); norms are of N·g, see the module doc.
        pos_norm, neg_norm   mean_n |N g⁺_n|, mean_n |N g⁻_n|
        balance              neg_norm / pos_norm: the effective λ (UniGrad: λ|Fu|/|u⁺|)
        cos_pos_neg          mean_n cos(g⁺_n, g⁻_n): −1 when the two only oppose each other
        cos_total_target     mean_n cos(g_n, −v⁺_n): 1 when the step is a pure pull to the target
        <part>_norm          each non-positive part's mean |N·part_n|, when there are several
    """
    rows = target.shape[0]
    positive = parts["positive"] * rows
    total = sum(parts.values()) * rows
    negative = total - positive
    pos_norm, neg_norm = float(positive.norm(dim=1).mean()), float(negative.norm(dim=1).mean())
    out = {
        "pos_norm": pos_norm,
        "neg_norm": neg_norm,
        "balance": neg_norm / max(pos_norm, 1e-12),
        "cos_pos_neg": float(F.cosine_similarity(positive, negative, dim=1).mean()),
        "cos_total_target": float(F.cosine_similarity(total, -target, dim=1).mean()),
    }
    others = [name for name in parts if name != "positive"]
    if len(others) > 1:
        out.update(
            {f"{name}_norm": float((parts[name] * rows).norm(dim=1).mean()) for name in others}
        )
    return out


# --- helpers that several methods' gradient_terms share -----------------------------------------


def scaled(parts: Parts, weight: float) -> Parts:
    """Every part times `weight`: the loss's own weight of the term (MoCo v3's 2τ, a mean's ½)."""
    return {name: weight * part for name, part in parts.items()}


def pair_weight(branch: SiameseTarget) -> float:
    """A symmetric loss with a target branch is ½[L(z1, t2) + L(t1, z2)] (target.SiameseTarget
    .pairs): each online view gets half of one term's gradient; online, L(z1, z2) gives each all."""
    return 1.0 if branch.is_online else 0.5


def predictor_terms(
    predictor: Callable[[Tensor], Tensor], pairs: list[tuple[Tensor, Tensor]], weight: float
) -> list[Term]:
    """The asymmetric family, BYOL (weight 2: 2 − 2cos) and SimSiam (weight ½: ½·(−cos)): for each
    (projection z, target t) pair, the cosine parts at the prediction p = predictor(z), and the
    same parts carried back to the projector output z through the predictor's Jacobian
    (vector-Jacobian products; linear, so the parts still sum to ∂L/∂z), prefixed "projection_".
    """
    terms = []
    for z, t in pairs:
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            p = predictor(z)  # each view its own BN batch, as in forward
            parts = scaled(cosine_parts(p.detach(), t), weight)
            through = {
                name: torch.autograd.grad(p, z, part, retain_graph=True)[0]
                for name, part in parts.items()
            }
        terms += [("", parts, t), ("projection_", through, t)]
    return terms


def decompose(method: Decomposable, views: Views) -> dict[str, float]:
    """The scalars of every loss term of `method` (its `gradient_terms`) on `views`, averaged
    over the terms (symmetrised losses: both); `balance` is the ratio of the averaged norms.
    Nothing of the method changes but what its forward would change (batch-norm statistics)."""
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        terms = method.gradient_terms(views)
    for prefix, parts, target in terms:
        for key, value in gradient_scalars(parts, target).items():
            sums.setdefault(prefix + key, []).append(value)
    return {key: sum(values) / len(values) for key, values in sums.items()}


def with_balance(scalars: dict[str, float]) -> dict[str, float]:
    """`balance` (and each prefix's) as the ratio of the averaged norms."""
    scalars = dict(scalars)
    for prefix in {key[: -len("pos_norm")] for key in scalars if key.endswith("pos_norm")}:
        pos_norm = max(scalars[f"{prefix}pos_norm"], 1e-12)
        scalars[f"{prefix}balance"] = scalars[f"{prefix}neg_norm"] / pos_norm
    return scalars
