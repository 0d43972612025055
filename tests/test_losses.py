"""Losses against direct transcriptions of their papers' formulas."""

import math

import torch

from selfsup.losses import nt_xent


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
