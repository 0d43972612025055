"""CPC: the patch grid, the row-causal context, InfoNCE over all patches, the pooled encoder."""

import numpy as np
import pytest
import torch

import selfsup
from selfsup.config import resolve
from selfsup.losses import in_batch_info_nce
from selfsup.methods.cpc import CPC, patch_grid
from selfsup.registry import BACKBONES
from selfsup.step import Views


def _images(n=3, size=16, seed=1):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("image", "size", "stride", "grid"), [(16, 8, 4, 3), (28, 12, 4, 5)])
def test_patch_grid_cuts_the_patches_at_multiples_of_the_stride(image, size, stride, grid):
    x = _images(2, image)
    patches = patch_grid(x, size, stride)
    assert patches.shape == (2, grid, grid, 1, size, size)
    for i in range(grid):
        for j in range(grid):
            top, left = i * stride, j * stride
            assert torch.equal(patches[:, i, j], x[:, :, top : top + size, left : left + size])


def test_context_never_sees_the_rows_it_predicts(tiny_backbone):
    method = CPC(tiny_backbone, patch_size=8, patch_stride=4, context_blocks=3)
    z = torch.randn(2, 8, 6, 5, requires_grad=True)  # (N, D, rows, cols)
    c = method.context(z)
    for i in range(6):
        for j in range(5):
            (grad,) = torch.autograd.grad(c[:, :, i, j].sum(), z, retain_graph=True)
            assert torch.all(grad[:, :, i + 1 :] == 0), (i, j)  # d c_ij / d z_i'j' = 0, i' > i
            assert grad[:, :, i, j].abs().max() > 0  # it does see its own patch
            if i > 0:
                assert grad[:, :, i - 1].abs().max() > 0  # and the rows above


def test_cpc_infonce_of_a_hand_built_case_matches_the_formula():
    generator = torch.Generator().manual_seed(0)
    predictions, candidates = (
        torch.randn(4, 3, generator=generator),
        torch.randn(6, 3, generator=generator),
    )
    positives = torch.tensor([5, 0, 2, 2])
    expected = []
    for m in range(4):  # -log exp(ẑ_m·z_p) / Σ_l exp(ẑ_m·z_l)
        scores = [float(predictions[m] @ candidates[l]) for l in range(6)]
        expected.append(-scores[positives[m]] + np.log(np.sum(np.exp(scores))))
    torch.testing.assert_close(
        in_batch_info_nce(predictions, candidates, positives),
        torch.tensor(np.mean(expected)).float(),
    )


def _patch_vectors(method, x):
    """z[n][i][j] by slicing each patch by hand and encoding it alone (eval mode: no BN batch)."""
    p, s = method.patch_size, method.patch_stride
    rows = (x.shape[-1] - p) // s + 1
    z = torch.zeros(len(x), method.backbone.num_features, rows, rows)
    for n in range(len(x)):
        for i in range(rows):
            for j in range(rows):
                z[n, :, i, j] = method.backbone(
                    x[n : n + 1, :, i * s : i * s + p, j * s : j * s + p]
                )[0]
    return z


def test_cpc_loss_is_info_nce_of_each_prediction_against_every_patch_of_the_batch(
    tiny_backbone, progress
):
    method = CPC(tiny_backbone, patch_size=6, patch_stride=2, prediction_steps=2).eval()
    x = _images(3, 16)  # a 6x6 grid: offsets k = 2, 3
    with torch.no_grad():
        loss = method(Views([x]), progress)["loss"]
        z = _patch_vectors(method, x)
        c = method.context(z)
    n, rows, cols = 3, 6, 6
    everything = [(b, i, j) for b in range(n) for i in range(rows) for j in range(cols)]
    terms = []
    for k, predictor in zip((2, 3), method.predictors, strict=True):
        for b, i, j in everything:
            if i + k >= rows:
                continue
            prediction = predictor(c[b, :, i, j])  # W_k c_ij
            scores = torch.stack([prediction @ z[b2, :, i2, j2] for b2, i2, j2 in everything])
            positive = everything.index((b, i + k, j))
            terms.append(torch.logsumexp(scores, 0) - scores[positive])
    assert len(terms) == n * cols * ((rows - 2) + (rows - 3))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-4, atol=1e-5)


def test_offsets_beyond_the_grid_are_skipped_and_a_grid_without_any_is_an_error(
    tiny_backbone, progress
):
    method = CPC(tiny_backbone, patch_size=8, patch_stride=4, prediction_steps=5)
    out = method(Views([_images(2, 16)]), progress)  # 3 rows: only k = 2
    out["loss"].backward()
    assert method.predictors[0].weight.grad.abs().sum() > 0
    assert all(p.weight.grad is None for p in method.predictors[1:])
    with pytest.raises(ValueError, match="method.patch_size"):
        CPC(tiny_backbone, patch_size=8, patch_stride=8)(Views([_images(2, 16)]), progress)
    with pytest.raises(ValueError, match="method.patch_size"):
        CPC(tiny_backbone, patch_size=32, patch_stride=4)(Views([_images(2, 16)]), progress)


def test_encoder_is_the_mean_patch_vector_of_the_grid(tiny_backbone):
    method = CPC(tiny_backbone, patch_size=8, patch_stride=4).eval()
    x = _images(3, 16)
    with torch.no_grad():
        features = method.encoder(x)
        expected = _patch_vectors(method, x).mean(dim=(2, 3))
    assert features.shape == (3, method.encoder.num_features)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


REAL = {
    "resnet18": {"name": "resnet18", "stem": "small", "width": 0.125},
    "vit_tiny": {"name": "vit_tiny", "patch_size": 4},
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_cpc_runs_on_resnet_and_vit_patch_encoders_built_at_the_patch_size(name, progress):
    torch.manual_seed(0)
    built = []

    def make_backbone(**changes):
        built.append(changes)
        return BACKBONES.build(REAL[name], **{"in_channels": 1, "image_size": 16, **changes})

    method = CPC(make_backbone(), make_backbone=make_backbone, patch_size=8, patch_stride=2)
    assert built[-1] == {"image_size": 8}  # a ViT's position embeddings: a 2x2 token grid
    out = method(Views([_images(4, 16)]), progress)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and "z_std" in out
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    assert method.encoder(_images(2, 16)).shape == (2, method.backbone.num_features)


@pytest.mark.parametrize(("layer_norm", "independent"), [(True, True), (False, False)])
def test_layer_norm_keeps_each_patch_vector_independent_of_the_other_patches(
    layer_norm, independent
):
    """v2 §4.1: with batch norm, a patch's vector depends on the other patches of the batch (the
    leak past the context's mask); with layer norm it depends on its own pixels only."""
    torch.manual_seed(0)
    resnet = BACKBONES.build(REAL["resnet18"], in_channels=1, image_size=8)
    method = CPC(resnet, patch_size=8, patch_stride=4, layer_norm=layer_norm).train()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in method.modules()) != layer_norm
    patches = torch.randn(6, 1, 8, 8)
    changed = patches.clone()
    changed[1:] = torch.randn(5, 1, 8, 8)  # every other patch of the batch
    with torch.no_grad():
        first, again = method.backbone(patches)[0], method.backbone(changed)[0]
    assert torch.allclose(first, again, atol=1e-6) == independent


def test_cpc_training_lowers_the_loss_and_learns_features_above_chance(tiny_config):
    # A 5x5 grid of 8-px patches (stride 2): offsets k = 2, 3, 4. Raw dot-product logits start far
    # above the uniform loss (log 800 = 6.7) and fall slowly; in trials the kNN rose from 29 % after
    # one epoch to 31 % after four (lr 2e-3: 26 %), so this checks training and above-chance kNN.
    tiny_config["method"] = {
        "name": "cpc",
        "patch_size": 8,
        "patch_stride": 2,
        "prediction_steps": 3,
    }
    tiny_config["views"] = {"name": "crop_flip", "size": 16, "scale": [0.7, 1.0]}
    tiny_config["optim"] = {"name": "adamw", "lr": 5e-4, "batch_size": 32, "weight_decay": 0.0,
                            "warmup_epochs": 0}  # fmt: skip
    tiny_config["train"].update(epochs=4, knn_every=4)
    run = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0
    assert [r["knn_top1"] for r in run.metrics if "knn_top1" in r][-1] > 20  # chance: 10 %
