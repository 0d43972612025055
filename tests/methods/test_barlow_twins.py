"""Barlow Twins: the cross-correlation of batch-standardised embeddings and eq. 1's loss, each
against a direct computation, and the method composed of them."""

import copy

import pytest
import torch
from torch import nn

from selfsup.config import load_config
from selfsup.losses import barlow_twins, cross_correlation
from selfsup.methods.barlow_twins import BarlowTwins
from selfsup.registry import parameters
from selfsup.step import Views

LAMBDA = 0.0051


def standardised_by_hand(z, eps):
    """Each column minus its batch mean, over sqrt(biased batch variance + eps), entry by entry."""
    n, d = z.shape
    out = torch.empty(n, d, dtype=torch.float64)
    for i in range(d):
        mean = sum(z[b, i].item() for b in range(n)) / n
        var = sum((z[b, i].item() - mean) ** 2 for b in range(n)) / n
        for b in range(n):
            out[b, i] = (z[b, i].item() - mean) / (var + eps) ** 0.5
    return out


def correlation_by_hand(z1, z2, eps=1e-5):
    """C_ij = 1/N Σ_b ẑ¹_bi ẑ²_bj (eq. 2), summed index by index."""
    a, b = standardised_by_hand(z1, eps), standardised_by_hand(z2, eps)
    n, d = a.shape
    return torch.tensor(
        [[sum(a[k, i] * b[k, j] for k in range(n)).item() / n for j in range(d)] for i in range(d)]
    )


def loss_by_hand(c, lambd):
    """Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij² (eq. 1), summed index by index."""
    d = c.shape[0]
    on = sum((1 - c[i, i].item()) ** 2 for i in range(d))
    off = sum(c[i, j].item() ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off


@pytest.fixture
def embeddings():
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(7, 4, generator=generator) * 3 + 1
    z2 = 0.5 * z1 + torch.randn(7, 4, generator=generator)  # correlated with z1, not equal
    return z1, z2


def test_cross_correlation_is_the_product_of_batch_standardised_views_over_n(embeddings):
    z1, z2 = embeddings
    torch.testing.assert_close(cross_correlation(z1, z2), correlation_by_hand(z1, z2))


def test_cross_correlation_standardises_as_the_official_affine_free_batch_norm(embeddings):
    z1, z2 = embeddings
    bn = nn.BatchNorm1d(4, affine=False).train()  # the code: bn(z1).T @ bn(z2) / N
    torch.testing.assert_close(cross_correlation(z1, z2), bn(z1).T @ bn(z2) / len(z1))


def test_barlow_twins_loss_is_on_diagonal_plus_lambda_times_off_diagonal_squares(embeddings):
    c = cross_correlation(*embeddings)
    expected = torch.tensor(loss_by_hand(c, LAMBDA))
    torch.testing.assert_close(barlow_twins(c, LAMBDA), expected)
    # λ weighs only the off-diagonal part: its derivative is Σ_{i≠j} C_ij²
    slope = barlow_twins(c, 1.0) - barlow_twins(c, 0.0)
    torch.testing.assert_close(slope, torch.tensor(loss_by_hand(c, 1.0) - loss_by_hand(c, 0.0)))


def test_identical_decorrelated_standardised_embeddings_give_zero_loss():
    # columns 1..4 of the 8 x 8 Sylvester-Hadamard matrix: ±1, mean 0, variance 1, orthogonal
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    hadamard = torch.kron(torch.kron(h2, h2), h2)
    z = hadamard[:, 1:5] * 2.5 + 7.0  # any scale and offset: the standardisation removes them
    c = cross_correlation(z, z, eps=0.0)
    torch.testing.assert_close(c, torch.eye(4))
    assert barlow_twins(c, LAMBDA).item() == pytest.approx(0.0, abs=1e-10)
    # with BN's eps the diagonal is 1/(1 + eps): the on-diagonal loss is still ~0
    assert barlow_twins(cross_correlation(z, z), LAMBDA).item() < 1e-8


def test_redundant_dimensions_are_penalised_off_the_diagonal():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(16, 3, generator=generator)
    redundant = torch.cat([z, z[:, :1]], dim=1)  # dimension 3 repeats dimension 0
    c = cross_correlation(redundant, redundant)
    assert c[0, 3].item() == pytest.approx(1.0, abs=1e-4)
    assert barlow_twins(c, LAMBDA).item() >= LAMBDA * 2 * 0.99  # C_03 and C_30 ≈ 1


def test_barlow_twins_method_loss_is_the_loss_of_its_projector_outputs_and_reaches_the_backbone(
    tiny_backbone, two_views, progress
):
    method = BarlowTwins(tiny_backbone, dim=6, hidden=16)
    out = method(Views(two_views), progress)
    with torch.no_grad():  # each view its own BN batch, as the method does
        z1, z2 = (method.projector(method.backbone(x)) for x in two_views)
    c = correlation_by_hand(z1, z2)
    torch.testing.assert_close(out["loss"].detach(), torch.tensor(loss_by_hand(c, LAMBDA)))
    torch.testing.assert_close(out["on_diag"], c.diagonal().mean())
    assert {"off_diag", "z_std"} <= set(out)
    out["loss"].backward()
    assert method.backbone.conv.weight.grad.abs().sum() > 0


def test_barlow_twins_multi_crop_averages_eq1_over_the_global_pair_and_small_global_pairs(
    tiny_backbone, two_views, progress
):
    """n small views: mean of L over (z1, z2) and each (small, global) pair, 1 + 2n terms."""
    generator = torch.Generator().manual_seed(2)
    small = [torch.randn(6, 1, 4, 4, generator=generator) for _ in range(2)]
    method = BarlowTwins(tiny_backbone, dim=6, hidden=16)
    out = method(Views(two_views, small), progress)
    with torch.no_grad():
        z1, z2, s1, s2 = (method.projector(method.backbone(x)) for x in two_views + small)
    pairs = [(z1, z2), (s1, z1), (s1, z2), (s2, z1), (s2, z2)]
    expected = sum(loss_by_hand(correlation_by_hand(a, b), LAMBDA) for a, b in pairs) / 5
    torch.testing.assert_close(out["loss"].detach(), torch.tensor(expected, dtype=torch.float32))
    out["loss"].backward()  # the small views' encoder passes are in the graph
    assert method.backbone.conv.weight.grad.abs().sum() > 0


def test_barlow_twins_projector_is_three_bias_free_linear_layers_with_bn_between(tiny_backbone):
    method = BarlowTwins(tiny_backbone, dim=12, hidden=10)
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    norms = [m for m in method.projector if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 10), (10, 10), (10, 12)]
    assert all(m.bias is None for m in linears) and len(norms) == 2
    assert not isinstance(method.projector[-1], nn.BatchNorm1d | nn.ReLU)  # z is the last Linear


def test_barlow_twins_defaults_are_the_official_codes():
    defaults = {k: p.default for k, p in parameters(BarlowTwins).items() if k != "backbone"}
    assert defaults == {
        "dim": 8192, "hidden": 8192, "layers": 3, "off_diagonal_weight": 0.0051, "loss_scale": 1.0
    }  # fmt: skip


def test_barlow_twins_loss_scale_multiplies_the_loss_and_every_gradient(
    tiny_backbone, two_views, progress
):
    """solo-learn's `scale_loss`: loss_scale · eq. 1, so every gradient is scaled as much."""
    grads = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        method = BarlowTwins(copy.deepcopy(tiny_backbone), dim=6, hidden=16, loss_scale=scale)
        out = method(Views(two_views), progress)
        with torch.no_grad():
            z1, z2 = (method.projector(method.backbone(x)) for x in two_views)
        expected = scale * loss_by_hand(correlation_by_hand(z1, z2), LAMBDA)
        torch.testing.assert_close(out["loss"].detach(), torch.tensor(expected))
        out["loss"].backward()
        grads[scale] = [p.grad.clone() for p in method.parameters()]
    for full, tenth in zip(grads[1.0], grads[0.1], strict=True):
        torch.testing.assert_close(tenth, 0.1 * full)


@pytest.mark.parametrize("recipe", ["barlow_twins/imagenet", "barlow_twins/fashion_mnist"])
def test_barlow_twins_recipes_resolve_with_byols_asymmetric_views(recipe):
    config = load_config(recipe)
    assert config.method["name"] == "barlow_twins" and config.views["name"] == "byol"
    assert config.optim.name == "lars" and not config.optim.decay_norms_and_biases


def test_barlow_twins_imagenet_recipe_is_the_official_codes_optimisation():
    config = load_config("barlow_twins/imagenet")
    optim = config.optim
    assert (optim.lr, optim.batch_size, optim.weight_decay, optim.warmup_epochs) == (
        0.2, 2048, 1e-6, 10
    )  # fmt: skip
    assert optim.final_lr == pytest.approx(0.001 * 0.2 * 2048 / 256)  # the code's end_lr
    assert config.train.epochs == 1000 and config.backbone["zero_init_residual"]
