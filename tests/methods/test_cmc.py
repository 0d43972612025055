"""CMC: Lab views, per-view encoders, the core and full graph objectives, per-view memory banks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfsup
from selfsup.augment import ops
from selfsup.config import resolve
from selfsup.methods.cmc import CMC
from selfsup.registry import BACKBONES, VIEWS
from selfsup.step import Progress, Views
from tests.methods.conftest import REAL_BACKBONES

# sRGB -> CIE Lab (D65), published values (e.g. Lindbloom's / easyrgb's calculators)
REFERENCE_LAB = [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),  # white
    ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),  # red
    ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),  # green
    ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),  # blue
    ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0)),  # mid grey
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),  # black
]


class Tiny(nn.Module):
    """conv-BN-ReLU-pool with any number of input channels (a view's encoder)."""

    num_features = 8

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).relu().mean(dim=(2, 3))


def tiny_cmc(in_channels=1, num_samples=20, **kwargs):
    torch.manual_seed(0)
    make = lambda in_channels=in_channels: Tiny(in_channels)  # noqa: E731
    return CMC(Tiny(in_channels), make_backbone=make, num_samples=num_samples, **kwargs)


def crops(num_views, n=6, channels=1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, 8, 8, generator=generator) for _ in range(num_views)]


PROGRESS = Progress(0, 0.0, 0.0)
INDEX = torch.tensor([3, 7, 0, 12, 19, 5])


def embeddings(method, inputs):
    return [
        F.normalize(head(encoder(x)), dim=1)
        for encoder, head, x in zip(method.encoder.encoders, method.heads, inputs, strict=True)
    ]


def two_view_memory_loss(z, banks, index, noise, i, j, temperature):
    """L(V_i, V_j) = L_{V_i,V_j} + L_{V_j,V_i} (eq. 3), each anchor by hand: candidates are the
    other view's bank entry of its own image followed by the entries noise[a]."""
    total = 0.0
    for q, k in ((i, j), (j, i)):
        terms = []
        for a in range(len(index)):
            candidates = torch.cat([banks[k][index[a]][None], banks[k][noise[a]]])  # (1 + K, D)
            logits = candidates @ z[q][a] / temperature
            terms.append(-(logits[0] - torch.logsumexp(logits, 0)))
        total = total + torch.stack(terms).mean()
    return total


def memory_setup(graph, num_views=3, num_negatives=5):
    method = tiny_cmc(views="crops", num_views=num_views, graph=graph, dim=4,
                      num_negatives=num_negatives)  # fmt: skip
    views = Views(crops(num_views), index=INDEX)
    torch.manual_seed(5)
    out = method(views, PROGRESS)
    torch.manual_seed(5)  # the same uniform noise draw as forward's
    noise = torch.randint(20, (len(INDEX), num_negatives))
    z = embeddings(method, views.large)
    banks = [bank.features for bank in method.banks]
    return method, out, z, banks, noise


@pytest.mark.parametrize(("rgb", "lab"), REFERENCE_LAB)
def test_lab_conversion_matches_published_reference_colours(rgb, lab):
    image = torch.tensor(rgb).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    result = ops.rgb_to_lab(image)
    assert result.shape == (2, 3, 4, 4)
    torch.testing.assert_close(result[:, :, 0, 0], torch.tensor([lab, lab]), atol=0.05, rtol=0)


def test_lab_views_normalise_the_crop_with_the_codes_fixed_lab_ranges():
    views = VIEWS.build({"name": "cmc", "size": 8})
    views.set_stats([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])  # RGB statistics: not used by Lab views
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    lab = ops.rgb_to_lab(x.float() / 255)
    mean = torch.tensor([50.0, 6.025, -6.6895]).view(1, 3, 1, 1)  # midpoints of the Lab ranges
    std = torch.tensor([50.0, 92.208, 101.1675]).view(1, 3, 1, 1)  # half ranges
    torch.testing.assert_close(views.eval_transform(x), (lab - mean) / std)
    (large,), small = views(x, torch.Generator().manual_seed(0))
    assert large.shape == (5, 3, 8, 8) and small == [] and large.abs().max() <= 1 + 1e-5


def test_lab_views_and_lab_method_reject_grayscale_data_with_the_fix_named():
    views = VIEWS.build({"name": "cmc", "size": 8})
    with pytest.raises(ValueError, match="color_space=rgb"):
        views.eval_transform(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="method.views=crops"):
        tiny_cmc(in_channels=1, views="lab")
    assert tiny_cmc(in_channels=1).views == "crops"  # auto: grayscale has no ab
    assert tiny_cmc(in_channels=3).views == "lab"


def test_lab_encoders_take_l_and_ab_and_the_representation_concatenates_them():
    method = tiny_cmc(in_channels=3, num_negatives=4)
    l_encoder, ab_encoder = method.encoder.encoders
    assert (l_encoder.conv.in_channels, ab_encoder.conv.in_channels) == (1, 2)
    x = torch.randn(4, 3, 8, 8)
    method.eval()
    with torch.no_grad():
        expected = torch.cat([l_encoder(x[:, :1]), ab_encoder(x[:, 1:])], 1)
        torch.testing.assert_close(method.encoder(x), expected)
    assert method.encoder.num_features == 16
    with pytest.raises(ValueError, match="color_space: lab"):
        method(Views([torch.randn(4, 1, 8, 8)], index=torch.arange(4)), PROGRESS)


def test_two_view_loss_contrasts_each_view_with_the_other_views_bank_both_ways():
    method, out, z, banks, noise = memory_setup("full", num_views=2)
    expected = two_view_memory_loss(z, banks, INDEX, noise, 0, 1, 0.07)
    torch.testing.assert_close(out["loss"], expected)


def test_full_graph_loss_is_the_sum_of_the_two_view_losses_over_all_pairs():
    method, out, z, banks, noise = memory_setup("full")
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(two_view_memory_loss(z, banks, INDEX, noise, i, j, 0.07) for i, j in pairs)
    torch.testing.assert_close(out["loss"], expected)


def test_core_graph_uses_only_the_pairs_with_view_one():
    method, out, z, banks, noise = memory_setup("core")
    pairs = [(0, 1), (0, 2)]
    expected = sum(two_view_memory_loss(z, banks, INDEX, noise, i, j, 0.07) for i, j in pairs)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()  # view 3 still learns, through its pair with view 1
    assert method.encoder.encoders[2].conv.weight.grad.abs().sum() > 0


def test_batch_negatives_full_graph_sums_cross_view_cross_entropy_over_pairs():
    method = tiny_cmc(views="crops", num_views=3, negatives="batch", dim=4, temperature=0.5)
    views = Views(crops(3))
    out = method(views, PROGRESS)
    z = embeddings(method, views.large)
    expected = 0.0
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        for q, k in ((i, j), (j, i)):
            for a in range(6):  # the other view of all 6 images are the candidates
                logits = torch.stack([z[q][a] @ z[k][b] for b in range(6)]) / 0.5
                expected = expected - (logits[a] - torch.logsumexp(logits, 0)) / 6
    torch.testing.assert_close(out["loss"], expected)
    assert not hasattr(method, "banks")


def test_each_views_bank_is_written_with_that_views_embeddings_only_after_the_step():
    method, out, z, banks, noise = memory_setup("full")
    before = [bank.clone() for bank in banks]
    method(Views(crops(3), index=INDEX), PROGRESS)  # forward writes nothing
    for old, bank in zip(before, banks, strict=True):
        assert torch.equal(old, bank)
    with torch.no_grad():
        method.after_step(PROGRESS, out)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[INDEX] = False
    for v in range(3):
        expected = F.normalize(0.5 * before[v][INDEX] + 0.5 * z[v].detach(), dim=1)
        torch.testing.assert_close(method.banks[v].features[INDEX], expected)
        assert torch.equal(method.banks[v].features[untouched], before[v][untouched])


@pytest.mark.parametrize(("name", "channels"), [("resnet18", 1), ("vit_tiny", 3)])
def test_cmc_runs_on_resnet_and_vit_backbones(name, channels):
    def make_backbone(in_channels=channels):
        return BACKBONES.build(REAL_BACKBONES[name], in_channels=in_channels, image_size=16)

    torch.manual_seed(0)
    method = CMC(
        make_backbone(), make_backbone=make_backbone, num_samples=10, dim=8, num_negatives=16
    )
    large = [torch.randn(4, channels, 16, 16)] * (1 if channels == 3 else 2)
    out = method(Views(large, index=torch.arange(4)), PROGRESS)
    out["loss"].backward()
    with torch.no_grad():
        method.after_step(PROGRESS, out)
    assert method.views == ("lab" if channels == 3 else "crops") and torch.isfinite(out["loss"])
    for encoder in method.encoder.encoders:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    method.eval()
    with torch.no_grad():
        features = method.encoder(torch.randn(3, channels, 16, 16))
    assert features.shape == (3, method.encoder.num_features)


def test_cmc_lab_training_lowers_the_loss_and_learns_features_above_chance(tiny_config):
    tiny_config["method"] = {"name": "cmc", "dim": 32, "num_negatives": 256, "temperature": 0.1}
    tiny_config["data"]["channels"] = 3  # colour: L and ab views, Lab also at evaluation
    tiny_config["views"] = {"name": "cmc", "size": 16, "scale": [0.4, 1.0]}
    tiny_config["optim"].update(lr=0.3, warmup_epochs=0)
    tiny_config["train"].update(epochs=3, knn_every=3)  # kNN 43 %, loss 13.3 -> 10.9
    run = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert [r["knn_top1"] for r in run.metrics if "knn_top1" in r][-1] > 30  # chance: 10 %
