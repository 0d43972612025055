"""Loss functions as pure math on tensors: no state, no detaching, no gathering.

Methods decide what is detached, gathered or queued (house rule R3); each function here is the
formula from its paper, written with log-softmax / cross-entropy for numerical safety.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    negatives: Tensor | None = None,
    targets: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) averaged over all 2N anchors.

    z1, z2 (N, D): embeddings of the two views; row i of z1 and row i of z2 are the positive pair,
    the other 2N - 2 embeddings are negatives. sim(u, v) = cosine similarity:
        l(i, j) = -log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ)
    negatives (K, D), optional: SimCLR v2's memory (arXiv 2006.10029 §2, MoCo's buffered keys),
    K more negatives n_1..n_K shared by every anchor, added to each denominator:
        l(i, j) = -log exp(s_ij/τ) / (Σ_{k≠i} exp(s_ik/τ) + Σ_{m=1..K} exp(sim(z_i, n_m)/τ))
    with s_ik = sim(z_i, z_k). None (or K = 0) is eq. 1 exactly.
    targets (t1, t2), (N, D) each, optional: the other side of every similarity, a target branch's
    embeddings of the same views (UniGrad, arXiv 2112.05141, Table 2): s_ik = sim(z_i, t_k), the
    anchors z, the positive and negatives t; None: t = z, eq. 1.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    t = z if targets is None else F.normalize(torch.cat(targets), dim=1)  # (2N, D)
    n = z1.shape[0]
    logits = z @ t.T / temperature  # (2N, 2N)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(
        self_mask, float("-inf")
    )  # k ≠ i: an anchor is not its own negative
    if negatives is not None:  # columns after the batch's: the positive's index is unchanged
        memory = z @ F.normalize(negatives, dim=1).T / temperature  # (2N, K)
        logits = torch.cat([logits, memory], dim=1)  # (2N, 2N + K)
    positive = torch.arange(2 * n, device=z.device).roll(n)  # i <-> i + N
    return F.cross_entropy(logits, positive)


def info_nce(query: Tensor, key: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """InfoNCE as a (1 + K)-way classification with the positive at index 0 (MoCo eq. 1).

    query, key (N, D): unit vectors, key[i] is query[i]'s positive; negatives (K, D): unit vectors
    shared by all queries (MoCo's queue).
        L = -log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_i exp(q·k_i/τ))
    """
    positive = (query * key).sum(dim=1, keepdim=True)  # (N, 1)
    negative = query @ negatives.T  # (N, K)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (N, 1 + K)
    target = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, target)


def regression(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's loss (Grill et al. 2020, eq. 2): ||p̄ - z̄||² = 2 - 2·cos(p, z), batch mean.

    prediction, target (N, D).
    """
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=1)).mean()


def negative_cosine(prediction: Tensor, target: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, z) (Chen & He 2021, eq. 1), batch mean. (N, D) each."""
    return -F.cosine_similarity(prediction, target, dim=1).mean()


def info_nce_hybrid(
    query: Tensor, key: Tensor, negatives: Tensor, own_similarity: Tensor, temperature: float
) -> Tensor:
    """InfoNCE with shared and per-query negatives: (1 + K + K_b)-way, positive at index 0.

    MoCo's hybrid dictionary (methods/moco.py), CMC's memory-bank loss: query, key (N, D) unit
    vectors, key[i] is query[i]'s positive; negatives (K, D) shared by all queries (the queue,
    K may be 0); own_similarity (N, K_b): q_i·b_ij with the negatives of query i alone
    (memory-bank rows, `MemoryBank.similarity`). With K_b = 0 this is `info_nce`.
        L = -log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_j exp(q·k_j/τ) + Σ_j exp(q·b_j/τ))
    """
    positive = (query * key).sum(dim=1, keepdim=True)  # (N, 1)
    shared = query @ negatives.T  # (N, K)
    logits = torch.cat([positive, shared, own_similarity], dim=1) / temperature  # (N, 1 + K + K_b)
    target = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, target)


def moco_v3_contrast(query: Tensor, keys: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """MoCo v3's ctr(q, k) (Chen, Xie & He 2021, Algorithm 1): in-batch InfoNCE, scaled by 2τ.

    query (N, D): this process's queries; keys (M, D), M >= N: the keys of the whole (gathered)
    batch. Query i's positive is keys[offset + i] (offset = rank·N), the other M − 1 keys are its
    negatives. Both are L2-normalised here (cosine similarity):
        ctr(q, k) = 2τ · mean_i −log exp(q_i·k_{offset+i}/τ) / Σ_j exp(q_i·k_j/τ)
    The factor 2τ cancels the 1/τ of the gradient: ∂ctr/∂q_i = 2(Σ_j p_ij k_j − k_{offset+i})/N
    for unit q_i (p_i the softmax over keys), so its scale does not depend on τ.
    """
    q, k = F.normalize(query, dim=1), F.normalize(keys, dim=1)
    positives = torch.arange(q.shape[0], device=q.device) + offset
    return in_batch_info_nce(q, k, positives, temperature) * (2 * temperature)


def nce(
    positive_logits: Tensor, noise_logits: Tensor, log_z: Tensor, noise_probability: float
) -> Tensor:
    """InstDisc's noise-contrastive estimation (Wu et al. 2018, §3.2, eq. 3-6), batch mean.

    positive_logits (N,): v_i·f/τ of each sample f with its own memory entry v_i; noise_logits
    (N, K): v_j·f/τ with K entries j drawn from the noise distribution P_n; log_z: log Z (0-d),
    the normalising constant of P(i|v) = exp(v_i·f/τ) / Z; noise_probability: P_n(i) (1/n).
        h(i, v) = P(i|v) / (P(i|v) + K·P_n(i))
        J = -1/N Σ_b [log h(i_b, v_b) + Σ_{k=1..K} log(1 - h(j_bk, v_b))]
    (eq. 6 with K·E_{P_n} estimated by the sum over the K drawn entries, and the batch mean of
    the official NCECriterion). Written with log h = logsigmoid(log P - log K·P_n) and
    log(1 - h) = logsigmoid(log K·P_n - log P), so no exp can overflow.
    """
    log_noise = positive_logits.new_tensor(noise_logits.shape[1] * noise_probability).log()
    data = F.logsigmoid(positive_logits - log_z - log_noise)  # (N,)
    noise = F.logsigmoid(log_noise - (noise_logits - log_z))  # (N, K)
    return -(data.sum() + noise.sum()) / positive_logits.shape[0]


def non_parametric_softmax(
    features: Tensor, bank: Tensor, index: Tensor, temperature: float
) -> Tensor:
    """InstDisc's full non-parametric softmax (Wu et al. 2018, eq. 1-2), batch mean.

    features (N, D): unit vectors f; bank (n, D): one unit vector v_j per training image;
    index (N,): the row of each sample's own entry.
        P(i|f) = exp(v_i·f/τ) / Σ_{j=1..n} exp(v_j·f/τ),  J = -1/N Σ_b log P(i_b|f_b)
    """
    return F.cross_entropy(features @ bank.T / temperature, index)


def invariant_spreading(anchors: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """Invariant and spreading instance features (Ye et al. 2019, §3.2, eq. 4-6), as the
    official BatchCriterion computes it: every one of the 2N views is an anchor, classified
    among all other 2N - 1 views of the batch. Batch mean over the 2N anchors.

    anchors, keys (2N, D): the same unit vectors (the method may detach `keys`); rows a and
    a ± N are the two augmentations of one image (a⁺: a's partner).
        P(b|a) = exp(x_a·x_b/τ) / Σ_{c≠a} exp(x_a·x_c/τ)
        J = -1/(2N) Σ_a [log P(a⁺|a) + Σ_{b≠a,a⁺} log(1 - P(b|a))]
    The paper's text classifies x̂_i among the N un-augmented f_k only and sums without the
    1/(2N); the code's denominators run over both views, with the positive pair in them.
    """
    n2 = anchors.shape[0]
    self_mask = torch.eye(n2, dtype=torch.bool, device=anchors.device)
    logits = (anchors @ keys.T / temperature).masked_fill(self_mask, float("-inf"))
    log_p = logits.log_softmax(dim=1)  # (2N, 2N); log P(b|a), -inf on the diagonal
    partner = torch.arange(n2, device=anchors.device).roll(n2 // 2)  # a <-> a + N
    positive = log_p.gather(1, partner[:, None]).squeeze(1)  # (2N,)
    # log(1 - P) = log(-expm1(log P)); the cap keeps it finite when one P rounds to 1.
    log_not = torch.log(-torch.expm1(log_p.clamp(max=-1e-7)))  # (2N, 2N)
    negative_mask = ~(self_mask | F.one_hot(partner, n2).bool())
    return -(positive.sum() + log_not[negative_mask].sum()) / n2


def in_batch_info_nce(
    query: Tensor, candidates: Tensor, positives: Tensor, temperature: float = 1.0
) -> Tensor:
    """InfoNCE where each query picks its positive among shared candidates, batch mean: CMC's
    L_{V1,V2} with the batch as the k + 1 candidates (Tian et al. 2019, eq. 2), CPC's loss
    (van den Oord et al. 2018, eq. 4, f = exp(zᵀ W_k c): raw dot products, τ = 1), MoCo v3's ctr.

    query (M, D); candidates (P, D): every query's positive and negatives; positives (M,): the row
    of candidates that is query m's positive (the other P − 1 rows are its negatives).
        L = -1/M Σ_m log exp(q_m·c_{p_m}/τ) / Σ_l exp(q_m·c_l/τ)
    """
    return F.cross_entropy(query @ candidates.T / temperature, positives)  # logits (M, P)


def supervised_contrastive(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """SupCon's L^sup_out (Khosla et al. 2020, arXiv 2004.11362, eq. 2), mean over anchors.

    features (M, D): every view of every image (M = views × N), L2-normalised here; labels (M,):
    each view's class. For anchor i, P(i) = the other views with i's label, A(i) = all views but i:
        L = 1/M Σ_i −1/|P(i)| Σ_{p∈P(i)} log exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ)
    An anchor without a positive adds 0 (the official code's guard). With every label distinct
    but shared by the two views of one image, this is NT-Xent (`nt_xent`).
    """
    z = F.normalize(features, dim=1)
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))  # a ∈ A(i): a ≠ i
    log_p = logits.log_softmax(dim=1)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask  # (M, M): p ∈ P(i)
    per_anchor = log_p.masked_fill(~positive, 0).sum(dim=1) / positive.sum(dim=1).clamp(min=1)
    return -per_anchor.mean()


def unigrad(online: Tensor, target: Tensor, correlation: Tensor, balance: float) -> Tensor:
    """UniGrad's loss (Tao et al. 2022, arXiv 2112.05141; official loss_unigrad), mean.

    online (N, D): unit vectors u (the online branch); target (N, D): unit vectors u⁺ of the other
    view from the momentum branch; correlation (D, D): F = Σ_v ρ_v v vᵀ, the moving average of
    the momentum features' correlation matrix. Target and F are constants (detach them):
        L = −u·u⁺ + λ/2 · uᵀ F u,   so   ∂L/∂u = −u⁺ + λ F u   (F symmetric)
    the positive gradient pulls u to the other view, the negative one pushes it away from the
    directions the features crowd in, λ (`balance`) weighs the two.
    """
    positive = (online * target).sum(dim=1)  # (N,)
    negative = ((online @ correlation) * online).sum(dim=1)  # uᵀ F u, (N,)
    return (-positive + 0.5 * balance * negative).mean()


def _off_diagonal_squares(matrix: Tensor) -> Tensor:
    """Σ_{i≠j} M_ij² of a square matrix M (D, D)."""
    eye = torch.eye(matrix.shape[0], dtype=torch.bool, device=matrix.device)
    return matrix.masked_fill(eye, 0).square().sum()


def cross_correlation(z1: Tensor, z2: Tensor, eps: float = 1e-5) -> Tensor:
    """Barlow Twins' cross-correlation matrix C (Zbontar et al. 2021, eq. 2), (D, D).

    z1, z2 (N, D): the two views' embeddings of the same N images, the whole (gathered) batch.
    Each is standardised over its own N rows as the official code's affine-free BatchNorm1d
    (synchronised over all GPUs, in training mode) does, so over the global batch: per dimension
    the mean and the biased variance, eps inside the root (BatchNorm1d's default 1e-5):
        ẑ_bi = (z_bi − mean_b z_bi) / sqrt(var_b z_bi + eps),   C_ij = 1/N Σ_b ẑ¹_bi ẑ²_bj
    With eps = 0, C_ij is eq. 2's cosine between the centred column i of z1 and column j of z2.
    Float32 even under autocast: 1 − C_ii near convergence is below bfloat16's resolution.
    """
    with torch.autocast(z1.device.type, enabled=False):
        a, b = (z.float() for z in (z1, z2))
        a = (a - a.mean(dim=0)) / (a.var(dim=0, correction=0) + eps).sqrt()
        b = (b - b.mean(dim=0)) / (b.var(dim=0, correction=0) + eps).sqrt()
        return a.T @ b / a.shape[0]


def barlow_twins(correlation: Tensor, off_diagonal_weight: float) -> Tensor:
    """Barlow Twins' loss (Zbontar et al. 2021, eq. 1) on the cross-correlation matrix C (D, D)
    of the two views (`cross_correlation`):
        L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²
    The invariance term pulls every C_ii to 1, the redundancy-reduction term (weight λ) every
    C_ij, i ≠ j, to 0. Sums, not means, as in the paper: λ is tuned for them (D = 8192).
    """
    on_diagonal = (1 - correlation.diagonal()).square().sum()
    return on_diagonal + off_diagonal_weight * _off_diagonal_squares(correlation)


def vicreg_variance(z: Tensor, std_target: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg's variance term v(Z) (Bardes et al. 2022, eq. 1-2): a hinge on each dimension's std.

    z (N, D): one branch's embeddings of the (gathered) batch; Var is the unbiased variance over
    the N rows (the code's `var`):
        v(Z) = 1/D Σ_j max(0, γ − S(z^j, ε)),   S(x, ε) = sqrt(Var(x) + ε)
    Zero once every dimension's std reaches γ (`std_target`); ε keeps the gradient finite at 0.
    """
    std = (z.float().var(dim=0) + eps).sqrt()  # (D,)
    return F.relu(std_target - std).mean()


def vicreg_covariance(z: Tensor) -> Tensor:
    """VICReg's covariance term c(Z) (Bardes et al. 2022, eq. 3-4): decorrelates the dimensions.

    z (N, D): one branch's embeddings of the (gathered) batch.
        C(Z) = 1/(N − 1) Σ_b (z_b − z̄)(z_b − z̄)ᵀ,   c(Z) = 1/D Σ_{i≠j} C(Z)_ij²
    Float32 even under autocast, as `cross_correlation`.
    """
    with torch.autocast(z.device.type, enabled=False):
        centred = z.float() - z.float().mean(dim=0)
        covariance = centred.T @ centred / (z.shape[0] - 1)  # (D, D)
        return _off_diagonal_squares(covariance) / z.shape[1]


def vicreg_terms(
    z1: Tensor, z2: Tensor, std_target: float = 1.0, eps: float = 1e-4
) -> tuple[Tensor, Tensor, Tensor]:
    """VICReg's invariance, variance and covariance terms (Bardes et al. 2022, eq. 5-6) of the two
    branches, combined over the branches as the official code does; the loss is λs + μv + νc.

    z1, z2 (N, D): the two views' embeddings of the same N images, the whole (gathered) batch.
        s = 1/(N·D) Σ_b ||z1_b − z2_b||²   (the code's mse_loss: eq. 5's s(Z, Z') divided by D)
        v = (v(Z1) + v(Z2)) / 2           (`vicreg_variance`; eq. 6 sums the two, the code halves)
        c = c(Z1) + c(Z2)                 (`vicreg_covariance`)
    """
    invariance = F.mse_loss(z1.float(), z2.float())
    variance = (vicreg_variance(z1, std_target, eps) + vicreg_variance(z2, std_target, eps)) / 2
    covariance = vicreg_covariance(z1) + vicreg_covariance(z2)
    return invariance, variance, covariance


def dino_distillation(
    student: list[Tensor],
    teacher: list[Tensor],
    center: Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> Tensor:
    """DINO's self-distillation loss (Caron et al. 2021, arXiv 2104.14294, eq. 3-4), averaged over
    the pairs of different crops as the official DINOLoss.

    student: V tensors (N, K), the student's outputs g_s(x_v) for every crop; teacher: G <= V
    tensors (N, K), the teacher's outputs g_t(x_i) for the global crops, crop i being student[i]
    (the global crops come first); center c (K,). Centring and sharpening the teacher:
        P_t(x) = softmax((g_t(x) − c) / τ_t),   P_s(x) = softmax(g_s(x) / τ_s)
        L = 1/(G(V − 1)) Σ_{i<G} Σ_{v<V, v≠i} 1/N Σ_n H(P_t(x_i)_n, P_s(x_v)_n)
    with H(a, b) = −Σ_k a_k log b_k: a crop is never its own target. Eq. 3 sums over the pairs;
    the code divides by their number. Float32 even under autocast (τ_t = 0.04 sharpens hard).
    """
    with torch.autocast(center.device.type, enabled=False):
        targets = [F.softmax((t.float() - center.float()) / teacher_temperature, dim=-1)
                   for t in teacher]  # fmt: skip
        log_predictions = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
        total, pairs = 0.0, 0
        for i, target in enumerate(targets):
            for v, log_prediction in enumerate(log_predictions):
                if v != i:  # skip the pair of a crop with itself
                    total = total - (target * log_prediction).sum(dim=-1).mean()
                    pairs += 1
        return total / pairs


def swapped_prediction(scores: list[Tensor], codes: list[Tensor], temperature: float) -> Tensor:
    """SwAV's swapped prediction loss (Caron et al. 2020, arXiv 2006.09882, eq. 1-2 and §3.2
    multi-crop), averaged over the pairs as the official code.

    scores: V tensors (N, K), z_v·c_k of crop v against the K prototypes; codes: G <= V tensors
    (N, K), the codes q_i of the crops whose codes were computed, crop i being scores[i] (those
    crops come first); each row of a code sums to 1. With p_v = softmax(z_v·C / τ):
        ℓ(z_v, q_i) = −Σ_k q_ik log p_vk                                            (eq. 2)
        L = 1/G Σ_{i<G} 1/(V − 1) Σ_{v<V, v≠i} 1/N Σ_n ℓ(z_v,n, q_i,n)
    Every crop predicts the code of each other crop, never its own: with V = G = 2 this is eq. 1,
    ℓ(z_t, q_s) + ℓ(z_s, q_t), halved. Float32 even under autocast.
    """
    with torch.autocast(scores[0].device.type, enabled=False):
        log_predictions = [F.log_softmax(s.float() / temperature, dim=-1) for s in scores]
        total = 0.0
        for i, code in enumerate(codes):
            others = [p for v, p in enumerate(log_predictions) if v != i]
            total = total - sum((code.float() * p).sum(dim=-1).mean() for p in others) / len(others)
        return total / len(codes)


def total_coding_rate(z: Tensor, eps_squared: float) -> Tensor:
    """The total coding rate R(Z) of b embeddings (the rate of MCR², Yu et al. 2020, arXiv
    2006.08558; EMP-SSL, Tong et al. 2023, arXiv 2304.03977 §3): the bits needed to code them up
    to a distortion ε, large when they spread over many directions, small when they collapse.

    z (..., b, d): the b embeddings z_j ∈ R^d as rows, i.e. Zᵀ for Z = [z_1 .. z_b] ∈ R^{d×b};
    every leading index is a Z of its own. eps_squared: ε² (EMP-SSL's code `--eps 0.2` enters as
    d/(b·eps), so it is ε²).
        R(Z) = ½ log det(I_d + d/(b ε²) Z Zᵀ)
    Computed as ½ log det(I_b + d/(b ε²) ZᵀZ), equal by Sylvester's determinant identity: a b×b
    matrix instead of d×d (b = 256 patches' rows against d = 1024 dims). Float32 even under
    autocast (a log-determinant in bf16 is noise); returns (...).
    """
    with torch.autocast(z.device.type, enabled=False):
        z = z.float() if z.dtype != torch.float64 else z
        b, d = z.shape[-2:]
        if b <= d:
            gram, size = z @ z.transpose(-1, -2), b  # ZᵀZ (..., b, b)
        else:
            gram, size = z.transpose(-1, -2) @ z, d  # Z Zᵀ (..., d, d)
        identity = torch.eye(size, dtype=z.dtype, device=z.device)
        return torch.logdet(identity + d / (b * eps_squared) * gram) / 2


def emp_ssl_terms(z: Tensor, eps_squared: float) -> tuple[Tensor, Tensor]:
    """EMP-SSL's two terms (Tong et al. 2023, arXiv 2304.03977 §3): the mean total coding rate of
    the patches and their mean similarity to their image's mean embedding; the loss is
    −(R + λ·D), the objective max 1/n Σ_i [R(Z_i) + λ D(Z_i, Z̄)] negated.

    z (n, b, d): the unit embeddings of patch i = 1..n of each of the b images (Z_i, rows b).
        R = 1/n Σ_i R(Z_i)                                  (`total_coding_rate`, over the batch)
        D = 1/n Σ_i 1/b Σ_j cos(z_ij, z̄_j),  z̄_j = 1/n Σ_i z_ij
    z̄ is the plain mean of the patch embeddings, not detached (the code's Similarity_Loss);
    cos normalises it. For unit z_ij, D = 1/b Σ_j |z̄_j| and z̄_j's direction maximises
    Σ_i cos(z_ij, ·), so detaching z̄ would not change the gradient. Returns (R, D).
    """
    rate = total_coding_rate(z, eps_squared).mean()
    mean = z.mean(dim=0, keepdim=True)  # Z̄ (1, b, d)
    invariance = F.cosine_similarity(z, mean, dim=-1).mean()
    return rate, invariance
