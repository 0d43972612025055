"""EMP-SSL: the loss −(R + λD) of the method's own patch embeddings against a direct computation,
the spread that the coding rate asks for, the patch views, and the bag-of-features encoder."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment import ops
from selfsup.config import load_config
from selfsup.losses import emp_ssl_terms
from selfsup.methods.emp_ssl import EMPSSL, BagOfFeatures, grid_offsets
from selfsup.registry import BACKBONES, VIEWS, parameters
from selfsup.step import Views


def rate_by_hand(z, eps_squared):
    """½ log det(I_d + d/(b ε²) Z Zᵀ) of the rows z (b, d), float64."""
    zt = z.double().T
    d, b = zt.shape
    return 0.5 * math.log(torch.det(torch.eye(d).double() + d / (b * eps_squared) * zt @ zt.T))


def loss_by_hand(z, invariance_weight, eps_squared):
    """−1/n Σ_i R(Z_i) − λ 1/n Σ_i 1/b Σ_j cos(z_ij, z̄_j), patch by patch, image by image."""
    n, b, _ = z.shape
    rate = sum(rate_by_hand(z[i], eps_squared) for i in range(n)) / n
    similarity = 0.0
    for j in range(b):
        mean = z[:, j].mean(dim=0)
        similarity += sum(F.cosine_similarity(z[i, j], mean, dim=0).item() for i in range(n))
    return -rate - invariance_weight * similarity / (n * b)


def patches(n=4, batch=6, size=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, size, size, generator=generator) for _ in range(n)]


def test_emp_ssl_loss_is_minus_rate_minus_200_times_invariance_of_its_patch_embeddings(
    tiny_backbone, progress
):
    method = EMPSSL(tiny_backbone, dim=5, hidden=16)
    crops = patches()
    out = method(Views(crops), progress)
    with torch.no_grad():  # all patches one BN batch, as the code's single forward
        z = F.normalize(method.projector(method.backbone(torch.cat(crops))), dim=1)
    z = z.view(4, 6, 5)
    assert out["loss"].item() == pytest.approx(loss_by_hand(z, 200.0, 0.2), rel=1e-5)
    assert out["coding_rate"].item() == pytest.approx(
        sum(rate_by_hand(z[i], 0.2) for i in range(4)) / 4, rel=1e-5
    )
    assert 0 < out["invariance"].item() < 1 and "z_std" in out
    out["loss"].backward()
    assert method.backbone.conv.weight.grad.abs().sum() > 0


def test_emp_ssl_small_views_are_patches_too(tiny_backbone, progress):
    method = EMPSSL(tiny_backbone, dim=5, hidden=16).eval()  # eval BN: batches do not matter
    crops = patches(n=3)
    small = [F.avg_pool2d(crops[2], 2)]  # a patch at another size
    with torch.no_grad():
        out = method(Views(crops[:2], small), progress)
        z = F.normalize(method.projector(torch.cat(method.encode(crops[:2] + small))), dim=1)
    assert out["loss"].item() == pytest.approx(loss_by_hand(z.view(3, 6, 5), 200.0, 0.2), rel=1e-5)


def test_coding_rate_makes_the_loss_prefer_images_spread_over_all_collapsed():
    # Both are perfectly invariant (every patch of an image equal, D = 1); only R tells them
    # apart: orthogonal images code at b/2·log(1 + d/(bε²)), one shared point at ½ log(1 + d/ε²).
    n, b, d = 4, 8, 16
    spread = torch.eye(d)[:b].expand(n, b, d)
    collapsed = F.normalize(torch.ones(d), dim=0).expand(n, b, d)
    rates, losses = [], []
    for z in (spread, collapsed):
        rate, invariance = emp_ssl_terms(z, 0.2)
        assert invariance.item() == pytest.approx(1.0)
        rates.append(rate.item())
        losses.append(-(rate + 200.0 * invariance).item())
    assert rates[0] == pytest.approx(b / 2 * math.log(1 + d / (b * 0.2)), rel=1e-5)
    assert rates[1] == pytest.approx(0.5 * math.log(1 + d / 0.2), rel=1e-5)
    assert losses[0] < losses[1] - 5
    # and, spread alike, patches that disagree lose to patches that agree (the invariance term)
    disagree = spread.clone()
    disagree[1:] = spread[1:].roll(shifts=1, dims=1)  # patches 1..3 of image j: image j − 1's
    rate, invariance = emp_ssl_terms(disagree, 0.2)
    assert rate.item() == pytest.approx(rates[0], rel=1e-5)  # each Z_i as spread as before
    assert invariance.item() == pytest.approx(math.sqrt(10) / 4)  # |e_j + 3 e_{j-1}| / 4
    assert -(rate + 200.0 * invariance).item() > losses[0] + 40


def test_emp_ssl_refuses_views_whose_patches_are_not_its_patch_size(tiny_backbone, progress):
    method = EMPSSL(tiny_backbone, dim=5, hidden=16, patch_size=4)
    with pytest.raises(ValueError, match="views.patch_size=4"):
        method(Views(patches(size=8)), progress)


def test_grid_offsets_reach_from_edge_to_edge_and_one_patch_is_centred():
    assert grid_offsets(28, 14, 3) == [0, 7, 14]
    assert grid_offsets(32, 16, 4) == [0, 5, 11, 16]
    assert grid_offsets(32, 16, 1) == [8]


class Means(nn.Module):
    """A patch encoder whose features can be checked by hand: each channel's mean and max."""

    num_features = 2

    def forward(self, x):
        return torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)


def test_bag_of_features_is_the_mean_of_the_features_of_a_fixed_grid_of_quarter_patches():
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    bag = BagOfFeatures(Means(), 2, patch_scale=0.25, patch_size=4, grid=2)  # 4-px, no resizing
    crops = [x[:, :, t : t + 4, u : u + 4] for t in (0, 4) for u in (0, 4)]
    expected = sum(Means()(c) for c in crops) / 4
    torch.testing.assert_close(bag(x), expected)
    # patch_size None: each 4-px patch resized to the image's 8 px, as the views resize them
    bag = BagOfFeatures(Means(), 2, patch_scale=0.25, patch_size=None, grid=2)
    expected = sum(Means()(ops.resize(c, 8)) for c in crops) / 4
    torch.testing.assert_close(bag(x), expected)


def test_emp_ssl_encoder_is_deterministic_and_averages_backbone_features(real_backbone):
    torch.manual_seed(0)
    method = EMPSSL(real_backbone, dim=8, hidden=16, eval_grid=3).eval()
    encoder = method.encoder
    assert encoder.num_features == real_backbone.num_features
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        first = encoder(x)
        torch.manual_seed(123)  # no randomness in evaluation
        again = method.encoder(x)
        by_hand = sum(real_backbone(p) for p in encoder.patches(x)) / 9
    assert first.shape == (4, real_backbone.num_features)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, by_hand)


def test_emp_ssl_projector_hidden_features_are_the_codes_evaluation_features(tiny_backbone):
    method = EMPSSL(tiny_backbone, dim=5, hidden=16, eval_grid=2, eval_features="projector_hidden")
    method.eval()
    encoder = method.encoder
    assert encoder.num_features == 16
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        hidden = method.projector[:3]  # Linear-BN-ReLU: the code's pre_feature
        by_hand = sum(hidden(method.backbone(p)) for p in encoder.patches(x)) / 4
        torch.testing.assert_close(encoder(x), by_hand)
    with pytest.raises(ValueError, match="hidden projector layer"):
        EMPSSL(tiny_backbone, layers=1, eval_features="projector_hidden")


REAL = {
    "resnet18": {"name": "resnet18", "stem": "small", "width": 0.125},
    "vit_tiny": {"name": "vit_tiny", "patch_size": 4},
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_emp_ssl_builds_its_patch_encoder_at_the_patch_size(name, progress):
    torch.manual_seed(0)
    built = []

    def make_backbone(**changes):
        built.append(changes)
        return BACKBONES.build(REAL[name], **{"in_channels": 1, "image_size": 16, **changes})

    method = EMPSSL(make_backbone(), make_backbone=make_backbone, dim=8, hidden=16, patch_size=8)
    assert built[-1] == {"image_size": 8}  # a ViT's position embeddings: a 2x2 token grid
    views = VIEWS.build({"name": "emp_ssl", "size": 16, "num_views": 3, "patch_size": 8})
    large, small = views(torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8),
                         torch.Generator().manual_seed(0))  # fmt: skip
    out = method(Views(large, small), progress)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    method.eval()
    with torch.no_grad():
        features = method.encoder(views.eval_transform(torch.zeros(2, 1, 16, 16)))
    assert features.shape == (2, method.backbone.num_features)


def test_emp_ssl_views_are_n_quarter_patches_of_whole_images():
    views = VIEWS.build({"name": "emp_ssl", "size": 28, "num_views": 5, "patch_size": 14})
    assert views.size == 28  # the run's image size and the evaluation input: whole images
    large, small = views(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8),
                         torch.Generator().manual_seed(0))  # fmt: skip
    assert len(large) == 5 and not small and {p.shape for p in large} == {(4, 1, 14, 14)}
    assert views.eval_transform(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape[-1] == 28
    spec = views.large[0]
    assert (spec.scale, spec.ratio, spec.jitter) == ((0.25, 0.25), (1.0, 1.0), (0.4, 0.4, 0.4, 0.2))
    assert (spec.jitter_p, spec.grayscale_p, spec.blur_p, spec.solarize_p) == (0.8, 0.2, 0.1, 0.1)
    # the code's CIFAR patches: resized back to the image's side
    paper = VIEWS.build({"name": "emp_ssl", "size": 32})
    assert len(paper.large) == 20 and paper.size == 32 and paper.large[0].size == 32
    with pytest.raises(ValueError, match="views.size"):
        VIEWS.build({"name": "emp_ssl", "size": None, "patch_size": 14})


def test_emp_ssl_projector_is_the_codes_linear_bn_relu_with_biases(tiny_backbone):
    method = EMPSSL(tiny_backbone, dim=12, hidden=10)
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 10), (10, 10), (10, 12)]
    assert all(m.bias is not None for m in linears)  # torch's default Linear, as model/model.py
    assert sum(isinstance(m, nn.BatchNorm1d) for m in method.projector) == 2


def test_emp_ssl_defaults_are_the_official_codes():
    defaults = {
        k: p.default
        for k, p in parameters(EMPSSL).items()
        if k not in ("backbone", "make_backbone")
    }
    assert defaults == {
        "dim": 1024, "hidden": 4096, "layers": 3, "invariance_weight": 200.0, "eps_squared": 0.2,
        "patch_size": None, "patch_scale": 0.25, "eval_grid": 4, "eval_features": "backbone",
    }  # fmt: skip


@pytest.mark.parametrize("recipe", ["emp_ssl/fashion_mnist", "emp_ssl/cifar10"])
def test_emp_ssl_recipes_resolve_with_patch_views(recipe):
    config = load_config(recipe)
    assert config.method["name"] == "emp_ssl" and config.views["name"] == "emp_ssl"
    assert config.method.get("patch_size") == config.views.get("patch_size")
    assert config.optim.name == "lars" and config.optim.warmup_epochs == 0


def test_emp_ssl_cifar10_recipe_is_the_official_one_epoch_command():
    config = load_config("emp_ssl/cifar10")
    assert config.views["num_views"] == 20 and config.method["invariance_weight"] == 200.0
    optim = config.optim
    assert (optim.lr, optim.lr_scaling, optim.batch_size, optim.weight_decay) == (
        0.3, "none", 100, 1e-4
    )  # fmt: skip
    # one epoch (500 steps of 100) of a 2-epoch cosine
    assert (config.train.epochs, config.train.max_steps) == (2, 500)
