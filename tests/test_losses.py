"""Losses against direct transcriptions of their papers' formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import (
    dino_distillation,
    emp_ssl_terms,
    info_nce,
    moco_v3_contrast,
    negative_cosine,
    non_parametric_softmax,
    nt_xent,
    regression,
    total_coding_rate,
)


def nt_xent_by_the_formula(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """SimCLR eq. 1, one anchor at a time: l(i,j) = -log e^{s_ij/τ} / Σ_{k≠i} e^{s_ik/τ}."""
    z = torch.cat([z1, z2]).double()
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [
            float(z[i] @ z[k] / (z[i].norm() * z[k].norm())) / temperature for k in range(2 * n)
        ]
        denominator = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[j]) / denominator)
    return total / (2 * n)


def test_nt_xent_equals_the_formula_on_random_inputs():
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.1, 0.5, 1.0):
        z1 = torch.randn(6, 5, generator=generator)
        z2 = torch.randn(6, 5, generator=generator)
        expected = nt_xent_by_the_formula(z1, z2, temperature)
        assert abs(nt_xent(z1, z2, temperature).item() - expected) < 1e-5


def test_nt_xent_excludes_self_similarity():
    # Identical views: if an anchor's similarity to itself (e^{1/τ}) were in the denominator, the
    # loss would be log 2 larger than the exact value below.
    z = torch.nn.functional.normalize(torch.eye(4), dim=1)
    temperature = 0.5
    loss = nt_xent(z, z, temperature).item()
    # each anchor: positive sim 1, 6 other sims 0 (orthogonal rows): -log e^{2} / (e^{2} + 6)
    expected = -math.log(math.exp(2) / (math.exp(2) + 6))
    assert abs(loss - expected) < 1e-6


def test_nt_xent_is_scale_invariant_and_stable_at_low_temperature():
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    assert torch.allclose(nt_xent(z1, z2, 0.2), nt_xent(10 * z1, 0.1 * z2, 0.2), atol=1e-5)
    assert torch.isfinite(nt_xent(z1.half().float(), z2, 0.005))


def test_nt_xent_gradient_matches_float64_finite_differences():
    generator = torch.Generator().manual_seed(2)
    z1 = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3), (z1, z2))


# ---- MoCo, BYOL, SimSiam -------------------------------------------------------------------------


def test_info_nce_with_a_queue_equals_the_per_sample_formula():
    torch.manual_seed(0)
    n, k, d, tau = 5, 9, 8, 0.2
    q = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    key = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    total = 0.0
    for i in range(n):  # L = -log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_i exp(q·k_i/τ))
        positive = math.exp(float(q[i] @ key[i]) / tau)
        negatives = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(k))
        total += -math.log(positive / (positive + negatives))
    assert info_nce(q, key, queue, tau).item() == pytest.approx(total / n, rel=1e-12)


def test_info_nce_is_log_of_one_plus_k_when_every_logit_is_equal():
    d, k = 4, 15
    q = F.one_hot(torch.zeros(3, dtype=torch.long), d).float()
    key = F.one_hot(torch.ones(3, dtype=torch.long), d).float()  # q·k+ = 0
    queue = F.one_hot(torch.full((k,), 2), d).float()  # q·k_i = 0
    torch.testing.assert_close(info_nce(q, key, queue, 0.07), torch.tensor(math.log(1 + k)))


def test_byol_regression_is_the_squared_distance_of_normalised_vectors():
    torch.manual_seed(0)
    p, z = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    per_sample = [
        float(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum()) for i in range(6)
    ]  # ||p̄ − z̄||² = 2 − 2·cos(p, z), BYOL eq. 2
    torch.testing.assert_close(regression(p, z), torch.tensor(sum(per_sample) / 6).double())


def test_simsiam_negative_cosine_is_minus_the_mean_cosine():
    torch.manual_seed(0)
    p, z = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    cosines = [float(p[i] @ z[i] / (p[i].norm() * z[i].norm())) for i in range(6)]
    torch.testing.assert_close(
        negative_cosine(p, z), torch.tensor(-sum(cosines) / 6, dtype=torch.float64)
    )


# ---- MoCo v3 ------------------------------------------------------------------------------------


def test_moco_v3_contrast_is_2tau_times_the_cross_entropy_of_each_query_over_all_keys():
    # Algorithm 1: ctr(q, k) = CrossEntropy(q·kᵀ/τ, labels) · 2τ with q, k normalised; the keys
    # are the whole gathered batch and query i's label is offset + i (this process's rows).
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    keys = torch.randn(12, 5, generator=generator, dtype=torch.float64)  # 3 processes' keys
    for temperature in (0.1, 0.2, 1.0):  # 2τ ≠ 1: a missing factor is seen
        for offset in (0, 4, 8):
            total = 0.0
            for i in range(len(q)):
                q_i = q[i] / q[i].norm()
                logits = [float(q_i @ (k / k.norm())) / temperature for k in keys]
                total += -math.log(math.exp(logits[offset + i]) / sum(math.exp(s) for s in logits))
            expected = 2 * temperature * total / len(q)
            loss = moco_v3_contrast(q, keys, temperature, offset)
            assert loss.item() == pytest.approx(expected, rel=1e-10)


# ---- DINO ---------------------------------------------------------------------------------------


def dino_by_the_formula(student, teacher, center, tau_s, tau_t, swapped=False):
    """Eq. 1-3 and Algorithm 1, one (teacher crop, student crop, sample) at a time:
    H(P_t(x_i), P_s(x_v)) with P_t = softmax((g_t − c)/τ_t), P_s = softmax(g_s/τ_s), over the
    pairs of a global crop i (teacher) with every other crop v ≠ i (student), averaged.
    swapped: the wrong way round, H(P_s(x_v), P_t(x_i)) (the student as the target)."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            for n in range(len(t)):
                p_t = [math.exp((t[n, k] - center[k]).item() / tau_t) for k in range(len(center))]
                p_s = [math.exp(s[n, k].item() / tau_s) for k in range(len(center))]
                z_t, z_s = sum(p_t), sum(p_s)
                if swapped:
                    p_t, p_s, z_t, z_s = p_s, p_t, z_s, z_t
                h = -sum(a / z_t * math.log(b / z_s) for a, b in zip(p_t, p_s, strict=True))
                total += h / len(t)
            pairs += 1
    return total / pairs


def test_dino_distillation_is_the_cross_entropy_of_the_centred_sharpened_teacher_over_pairs():
    # 2 global + 2 local crops, N = 3, K = 5; the teacher sees only the global crops
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    teacher = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(5, generator=generator, dtype=torch.float64)
    tau_s, tau_t = 0.1, 0.04
    expected = dino_by_the_formula(student, teacher, center, tau_s, tau_t)
    loss = dino_distillation(student, teacher, center, tau_s, tau_t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # the loss runs in float32
    # what a wrong mechanism would give is another number: teacher and student swapped, their
    # temperatures swapped, no centring, and each global crop also paired with itself
    with_itself = sum(
        dino_by_the_formula([s, s], [t], center, tau_s, tau_t)  # the pair (crop i, crop i) alone
        for s, t in zip(student[:2], teacher, strict=True)
    )
    wrong = [
        dino_by_the_formula(student, teacher, center, tau_s, tau_t, swapped=True),
        dino_by_the_formula(student, teacher, center, tau_t, tau_s),
        dino_by_the_formula(student, teacher, torch.zeros_like(center), tau_s, tau_t),
        (expected * 2 * 3 + with_itself) / (2 * 4),  # 2 x 3 pairs, and the 2 same-crop pairs
    ]
    assert all(abs(loss.item() - value) > 1e-3 * abs(value) for value in wrong)


# ---- InstDisc -----------------------------------------------------------------------------------


def test_non_parametric_softmax_is_the_mean_negative_log_probability_over_the_bank():
    # Wu et al. 2018 eq. 2: P(i|f) = exp(v_iᵀf/τ) / Σ_j exp(v_jᵀf/τ), j over all n bank entries
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(4, 6, generator=generator, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(10, 6, generator=generator, dtype=torch.float64), dim=1)
    index = torch.tensor([7, 0, 3, 9])
    temperature = 0.07
    total = 0.0
    for b in range(len(features)):
        terms = [math.exp(float(bank[j] @ features[b]) / temperature) for j in range(len(bank))]
        total += -math.log(terms[index[b]] / sum(terms))
    loss = non_parametric_softmax(features, bank, index, temperature)
    assert loss.item() == pytest.approx(total / len(features), rel=1e-10)


# ---- EMP-SSL -----------------------------------------------------------------------------------


def coding_rate_by_the_formula(z: torch.Tensor, eps_squared: float) -> float:
    """R(Z) = ½ log det(I_d + d/(b ε²) Z Zᵀ), Z = zᵀ (d × b): the d×d determinant, float64."""
    zt = z.double().T  # Z (d, b)
    d, b = zt.shape
    matrix = torch.eye(d, dtype=torch.float64) + d / (b * eps_squared) * zt @ zt.T
    return 0.5 * math.log(torch.det(matrix).item())


@pytest.mark.parametrize("b, d", [(4, 6), (9, 5)])  # fewer rows than dims, and more
def test_total_coding_rate_is_half_the_log_det_of_the_scaled_covariance(b, d):
    generator = torch.Generator().manual_seed(b)
    z = F.normalize(torch.randn(3, b, d, generator=generator), dim=-1)  # three Z's at once
    rates = total_coding_rate(z, 0.2)
    assert rates.shape == (3,)
    for rate, one in zip(rates, z, strict=True):
        assert rate.item() == pytest.approx(coding_rate_by_the_formula(one, 0.2), rel=1e-5)
    # the same through the eigenvalues λ_k of ZᵀZ: R = ½ Σ_k log(1 + d/(b ε²) λ_k)
    eigenvalues = torch.linalg.eigvalsh(z[0].double() @ z[0].double().T)
    by_eigenvalues = 0.5 * torch.log1p(d / (b * 0.2) * eigenvalues).sum().item()
    assert rates[0].item() == pytest.approx(by_eigenvalues, rel=1e-5)


def test_total_coding_rate_of_orthonormal_rows_fixes_the_half_and_the_scale_d_over_b_eps_squared():
    # b orthonormal rows: ZᵀZ = I_b, so R = b/2 · log(1 + d/(b ε²)) exactly; the usual slips give
    # other numbers: no ½, ε instead of ε², the scale b/d or 1/ε² alone
    b, d, eps_squared = 3, 8, 0.2
    z = torch.eye(d)[:b] * torch.tensor([1.0, -1.0, 1.0]).view(-1, 1)
    rate = total_coding_rate(z, eps_squared).item()
    assert rate == pytest.approx(b / 2 * math.log(1 + d / (b * eps_squared)), rel=1e-6)
    wrong = [
        b * math.log(1 + d / (b * eps_squared)),  # no ½
        b / 2 * math.log(1 + d / (b * eps_squared**0.5)),  # ε, not ε²
        b / 2 * math.log(1 + b / (d * eps_squared)),  # b/d for d/b
        b / 2 * math.log(1 + 1 / eps_squared),  # no d/b
    ]
    assert all(abs(rate - value) > 0.05 for value in wrong)


def test_total_coding_rate_is_smallest_when_the_embeddings_collapse():
    # unit rows that all coincide: ZᵀZ is the all-ones matrix, one eigenvalue b, so
    # R = ½ log(1 + d/ε²), the least of any b unit vectors (trace b, log concave)
    b, d, eps_squared = 8, 16, 0.2
    collapsed = F.normalize(torch.ones(b, d), dim=1)
    assert total_coding_rate(collapsed, eps_squared).item() == pytest.approx(
        0.5 * math.log(1 + d / eps_squared), rel=1e-6
    )
    spread = F.normalize(torch.randn(b, d, generator=torch.Generator().manual_seed(0)), dim=1)
    assert total_coding_rate(spread, eps_squared) > total_coding_rate(collapsed, eps_squared) + 5


def test_total_coding_rate_runs_in_float32_under_autocast():
    z = F.normalize(torch.randn(6, 10, generator=torch.Generator().manual_seed(1)), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rate = total_coding_rate(z.bfloat16(), 0.2)
    assert rate.dtype == torch.float32
    assert rate.item() == pytest.approx(total_coding_rate(z.bfloat16().float(), 0.2).item())


def test_emp_ssl_terms_are_the_mean_rate_and_mean_cosine_to_the_patch_average_over_patches():
    # Tong et al. 2023 §3: R = 1/n Σ_i R(Z_i), D = 1/n Σ_i 1/b Σ_j cos(z_ij, z̄_j), one patch at
    # a time; z̄_j the plain mean of image j's n patch embeddings
    n, b, d, eps_squared = 4, 5, 7, 0.2
    generator = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(n, b, d, generator=generator, dtype=torch.float64), dim=-1)
    rate, invariance = emp_ssl_terms(z, eps_squared)
    expected_rate = sum(coding_rate_by_the_formula(z[i], eps_squared) for i in range(n)) / n
    total = 0.0
    for i in range(n):
        for j in range(b):
            mean = sum(z[k, j] for k in range(n)) / n
            total += float(z[i, j] @ mean / (z[i, j].norm() * mean.norm()))
    assert rate.item() == pytest.approx(expected_rate, rel=1e-10)
    assert invariance.item() == pytest.approx(total / (n * b), rel=1e-10)


def test_emp_ssl_invariance_is_one_when_every_patch_of_an_image_agrees():
    image = F.normalize(torch.randn(5, 7, generator=torch.Generator().manual_seed(2)), dim=1)
    z = image.expand(4, 5, 7)  # n = 4 identical patches of each of b = 5 images
    _, invariance = emp_ssl_terms(z, 0.2)
    assert invariance.item() == pytest.approx(1.0)


def test_emp_ssl_invariance_of_unit_patches_is_the_norm_of_their_mean_detached_or_not():
    # For unit z_ij, Σ_i cos(z_ij, z̄_j) = n·|z̄_j|: D is the mean length of the patch means, and
    # z̄_j's direction maximises it, so the gradient through z̄ is zero; the code's undetached z̄
    # and a detached one train alike.
    z = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = F.normalize(z, dim=-1).requires_grad_()
    _, invariance = emp_ssl_terms(z, 0.2)
    assert invariance.item() == pytest.approx(z.mean(dim=0).norm(dim=-1).mean().item(), rel=1e-12)
    (grad,) = torch.autograd.grad(invariance, z)
    detached = z.detach().mean(dim=0, keepdim=True)
    (grad_detached,) = torch.autograd.grad(F.cosine_similarity(z, detached, dim=-1).mean(), z)
    torch.testing.assert_close(grad, grad_detached)
