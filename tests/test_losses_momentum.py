"""The losses of MoCo, BYOL and SimSiam against per-sample transcriptions of their formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import info_nce, negative_cosine, regression


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
