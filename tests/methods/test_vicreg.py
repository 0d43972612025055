"""VICReg: the invariance, variance and covariance terms against direct computations of the
paper's formulas, their 25 / 25 / 1 weighting, and the method composed of them."""

import pytest
import torch
from torch import nn

from selfsup.config import load_config
from selfsup.losses import vicreg_covariance, vicreg_terms, vicreg_variance
from selfsup.methods.vicreg import VICReg
from selfsup.registry import parameters
from selfsup.step import Views


def column_means(z):
    n, d = z.shape
    return [sum(z[b, i].item() for b in range(n)) / n for i in range(d)]


def variance_by_hand(z, gamma=1.0, eps=1e-4):
    """v(Z) = 1/d Σ_j max(0, γ − sqrt(Var(z^j) + ε)), Var unbiased (eq. 1-2), column by column."""
    n, d = z.shape
    means = column_means(z)
    hinge = 0.0
    for j in range(d):
        var = sum((z[b, j].item() - means[j]) ** 2 for b in range(n)) / (n - 1)
        hinge += max(0.0, gamma - (var + eps) ** 0.5)
    return hinge / d


def covariance_by_hand(z):
    """c(Z) = 1/d Σ_{i≠j} C_ij², C_ij = 1/(n−1) Σ_b (z_bi − z̄_i)(z_bj − z̄_j) (eq. 3-4)."""
    n, d = z.shape
    means = column_means(z)
    total = 0.0
    for i in range(d):
        for j in range(d):
            if i != j:
                c_ij = sum(
                    (z[b, i].item() - means[i]) * (z[b, j].item() - means[j]) for b in range(n)
                ) / (n - 1)
                total += c_ij**2
    return total / d


def invariance_by_hand(z1, z2):
    """The code's mse_loss: the mean of (z1_bi − z2_bi)² over all N·D entries."""
    n, d = z1.shape
    return sum((z1[b, i].item() - z2[b, i].item()) ** 2 for b in range(n) for i in range(d)) / (
        n * d
    )


@pytest.fixture
def embeddings():
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(9, 5, generator=generator) * torch.tensor([0.2, 0.5, 1.0, 2.0, 0.05])
    z2 = z1 + 0.3 * torch.randn(9, 5, generator=generator)
    return z1, z2


def test_variance_term_is_the_mean_hinge_on_each_dimensions_regularised_std(embeddings):
    z1, _ = embeddings
    assert vicreg_variance(z1).item() == pytest.approx(variance_by_hand(z1), rel=1e-5)
    assert vicreg_variance(z1, 2.0, 1e-2).item() == pytest.approx(
        variance_by_hand(z1, 2.0, 1e-2), rel=1e-5
    )


def test_variance_term_is_zero_when_every_dimension_has_std_at_least_gamma():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(64, 8, generator=generator)
    z = (z - z.mean(dim=0)) / z.std(dim=0) * torch.linspace(1.0, 4.0, 8)  # stds 1 .. 4
    assert vicreg_variance(z).item() == 0.0


def test_variance_term_is_positive_when_the_embeddings_collapse():
    collapsed = torch.full((16, 8), 3.0)  # every sample the same point: std 0
    assert vicreg_variance(collapsed).item() == pytest.approx(1.0 - 1e-4**0.5)  # γ − sqrt(ε)
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)) * 0.1  # std ≈ 0.1 < γ
    assert vicreg_variance(z).item() > 0.8


def test_covariance_term_is_the_sum_of_squared_off_diagonal_covariances_over_d(embeddings):
    z1, _ = embeddings
    assert vicreg_covariance(z1).item() == pytest.approx(covariance_by_hand(z1), rel=1e-5)


def test_covariance_term_ignores_the_variances_on_the_diagonal():
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(32, 4, generator=generator)
    q, _ = torch.linalg.qr(z - z.mean(dim=0))  # centred, orthogonal columns: covariance diagonal
    assert vicreg_covariance(q * torch.tensor([1.0, 5.0, 0.1, 2.0])).item() < 1e-10


def test_vicreg_terms_are_the_mse_the_mean_of_both_variances_and_the_sum_of_both_covariances(
    embeddings,
):
    z1, z2 = embeddings
    invariance, variance, covariance = vicreg_terms(z1, z2)
    assert invariance.item() == pytest.approx(invariance_by_hand(z1, z2), rel=1e-5)
    expected_variance = (variance_by_hand(z1) + variance_by_hand(z2)) / 2  # the code's /2
    assert variance.item() == pytest.approx(expected_variance, rel=1e-5)
    expected_covariance = covariance_by_hand(z1) + covariance_by_hand(z2)
    assert covariance.item() == pytest.approx(expected_covariance, rel=1e-5)


def test_vicreg_method_loss_is_25_25_1_times_the_terms_of_its_projector_outputs(
    tiny_backbone, two_views, progress
):
    method = VICReg(tiny_backbone, dim=5, hidden=16)
    out = method(Views(two_views), progress)
    with torch.no_grad():  # each view its own BN batch, as the method does
        z1, z2 = (method.projector(method.backbone(x)) for x in two_views)
    s = invariance_by_hand(z1, z2)
    v = (variance_by_hand(z1) + variance_by_hand(z2)) / 2
    c = covariance_by_hand(z1) + covariance_by_hand(z2)
    assert min(s, v, c) > 0  # every weight is checked
    assert out["loss"].item() == pytest.approx(25 * s + 25 * v + 1 * c, rel=1e-5)
    for name, value in (("invariance", s), ("variance", v), ("covariance", c)):
        assert out[name].item() == pytest.approx(value, rel=1e-5)
    assert "z_std" in out
    out["loss"].backward()
    assert method.backbone.conv.weight.grad.abs().sum() > 0


def test_vicreg_weights_scale_their_own_terms(tiny_backbone, two_views, progress):
    method = VICReg(tiny_backbone, dim=5, hidden=16)
    out = method(Views(two_views), progress)
    reweighted = VICReg(tiny_backbone, dim=5, hidden=16, invariance_weight=2.0,
                        variance_weight=3.0, covariance_weight=7.0)  # fmt: skip
    reweighted.load_state_dict(method.state_dict())
    terms = reweighted(Views(two_views), progress)
    expected = 2 * terms["invariance"] + 3 * terms["variance"] + 7 * terms["covariance"]
    torch.testing.assert_close(terms["loss"].detach(), expected)
    torch.testing.assert_close(terms["invariance"], out["invariance"])


def test_vicreg_expander_has_biases_on_hidden_layers_and_none_on_the_last(tiny_backbone):
    method = VICReg(tiny_backbone, dim=12, hidden=10)
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 10), (10, 10), (10, 12)]
    assert [m.bias is not None for m in linears] == [True, True, False]  # the code's Projector
    assert sum(isinstance(m, nn.BatchNorm1d) for m in method.projector) == 2


def test_vicreg_defaults_are_the_official_codes():
    defaults = {k: p.default for k, p in parameters(VICReg).items() if k != "backbone"}
    assert defaults == {
        "dim": 8192, "hidden": 8192, "layers": 3, "invariance_weight": 25.0,
        "variance_weight": 25.0, "covariance_weight": 1.0, "std_target": 1.0, "eps": 1e-4,
    }  # fmt: skip


@pytest.mark.parametrize("recipe", ["vicreg/imagenet", "vicreg/fashion_mnist"])
def test_vicreg_recipes_resolve_with_byols_asymmetric_views(recipe):
    config = load_config(recipe)
    assert config.method["name"] == "vicreg" and config.views["name"] == "byol"
    assert config.optim.name == "lars" and not config.optim.decay_norms_and_biases


def test_vicreg_imagenet_recipe_is_the_official_codes_optimisation():
    config = load_config("vicreg/imagenet")
    optim = config.optim
    assert (optim.lr, optim.batch_size, optim.weight_decay, optim.warmup_epochs) == (
        0.2, 2048, 1e-6, 10
    )  # fmt: skip
    assert optim.final_lr == pytest.approx(0.001 * 0.2 * 2048 / 256)  # the code's end_lr
    assert config.train.epochs == 1000 and config.backbone["zero_init_residual"]
