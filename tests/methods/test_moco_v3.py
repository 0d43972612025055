"""MoCo v3: the 2τ-scaled symmetrised InfoNCE against in-batch momentum keys, the heads, the
cosine momentum, the frozen random patch projection, training."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfsup
from selfsup.config import OptimConfig, resolve
from selfsup.engine.optim import Schedule, build_optimizer
from selfsup.engine.step import Precision, training_step
from selfsup.losses import moco_v3_contrast
from selfsup.methods.moco_v3 import MoCoV3
from selfsup.registry import BACKBONES
from selfsup.step import Progress, Views


def ctr_by_hand(q, k, temperature, offset=0):
    """2τ · mean_i −log softmax_j(q̂_i·k̂_j/τ) at j = offset + i, one query at a time (Alg. 1)."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[j]) / temperature for j in range(len(k))]
        log_denominator = math.log(sum(math.exp(s) for s in logits))
        total += -(logits[offset + i] - log_denominator)
    return 2 * temperature * total / len(q)


def _queries_and_keys(method, x1, x2):
    with torch.no_grad():
        q1, q2 = (method.predictor(method.projector(method.backbone(x))) for x in (x1, x2))
        k1, k2 = method.target(x1), method.target(x2)
    return q1, q2, k1, k2


def test_the_2tau_scale_makes_the_query_gradient_independent_of_the_temperature():
    # For unit q_i: ∂ctr/∂q_i = (I − q_i q_iᵀ) · 2(Σ_j p_ij k_j − k_i)/N, with no 1/τ in front.
    generator = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(4, 6, generator=generator, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(4, 6, generator=generator, dtype=torch.float64), dim=1)
    for temperature in (0.05, 0.2, 1.0, 5.0):
        q_ = q.clone().requires_grad_()
        moco_v3_contrast(q_, k, temperature).backward()
        p = torch.softmax(q @ k.T / temperature, dim=1)  # (N, N)
        raw = 2 * (p @ k - k) / len(q)
        expected = raw - (raw * q).sum(dim=1, keepdim=True) * q  # project out the norm direction
        torch.testing.assert_close(q_.grad, expected)
        unscaled = F.cross_entropy(q @ k.T / temperature, torch.arange(4))
        assert moco_v3_contrast(q, k, temperature).item() == pytest.approx(
            2 * temperature * unscaled.item()
        )


def test_moco_v3_loss_is_the_symmetrised_contrast_of_each_query_with_the_other_views_keys(
    tiny_backbone, two_views, progress
):
    method = MoCoV3(tiny_backbone, dim=4, hidden=16, temperature=0.2)
    loss = method(Views(two_views), progress)["loss"]
    q1, q2, k1, k2 = _queries_and_keys(method, *two_views)
    expected = ctr_by_hand(q1, k2, 0.2) + ctr_by_hand(q2, k1, 0.2)  # ctr(q1, k2) + ctr(q2, k1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_swapping_the_two_views_gives_the_same_loss(tiny_backbone, two_views, progress):
    method = MoCoV3(tiny_backbone, dim=4, hidden=16)
    x1, x2 = two_views
    forward = method(Views([x1, x2]), progress)["loss"]
    swapped = method(Views([x2, x1]), progress)["loss"]
    torch.testing.assert_close(forward, swapped)


def test_keys_are_gathered_across_processes_with_this_process_positives_at_rank_times_n(
    tiny_backbone, two_views, progress
):
    # Two processes, this one rank 1: the gathered keys are (other process's, ours).
    method = MoCoV3(tiny_backbone, dim=4, hidden=16, temperature=0.5)
    other = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    second_of_two = SimpleNamespace(rank=1, parts=2, gather_nograd=lambda x: torch.cat([other, x]))
    loss = method(Views(two_views, global_batch=second_of_two), progress)["loss"]
    q1, q2, k1, k2 = _queries_and_keys(method, *two_views)
    expected = ctr_by_hand(q1, torch.cat([other, k2]), 0.5, offset=6) + ctr_by_hand(
        q2, torch.cat([other, k1]), 0.5, offset=6
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_momentum_encoder_gets_no_gradient_and_follows_the_cosine_momentum(
    tiny_backbone, two_views
):
    method = MoCoV3(tiny_backbone, dim=4, hidden=16, momentum=0.9)
    key_weight = method.target.copies[0].conv.weight.clone()  # copies: (backbone, projector)
    progress = Progress(step=5, epoch=0.5, fraction=0.25)
    out = method(Views(two_views), progress)
    out["loss"].backward()
    assert all(p.grad is None for p in method.target.parameters())
    assert method.backbone.conv.weight.grad.abs().sum() > 0
    torch.optim.SGD(method.parameters(), lr=1.0).step()
    with torch.no_grad():
        method.after_step(progress, out)
    m = 1 - 0.5 * (1 + math.cos(math.pi * 0.25)) * (1 - 0.9)  # the code's adjust_moco_momentum
    expected = m * key_weight + (1 - m) * method.backbone.conv.weight
    torch.testing.assert_close(method.target.copies[0].conv.weight, expected)


def test_momentum_encoder_is_backbone_and_projector_without_the_predictor(tiny_backbone):
    method = MoCoV3(tiny_backbone, dim=4, hidden=16)
    online = [*method.backbone.parameters(), *method.projector.parameters()]
    copies = list(method.target.parameters())
    assert [p.shape for p in copies] == [p.shape for p in online]
    assert all(c is not p for c, p in zip(copies, online, strict=True))


def _layout(head):
    return [
        (type(m).__name__, getattr(m, "out_features", None), getattr(m, "affine", None))
        for m in head
    ]


def test_heads_match_the_official_code_for_vit_and_resnet(tiny_backbone):
    vit = MoCoV3(tiny_backbone)  # defaults: the ViT heads, 4096 hidden, 256 out
    assert _layout(vit.projector) == [
        ("Linear", 4096, None), ("BatchNorm1d", None, True), ("ReLU", None, None),
        ("Linear", 4096, None), ("BatchNorm1d", None, True), ("ReLU", None, None),
        ("Linear", 256, None), ("BatchNorm1d", None, False),
    ]  # fmt: skip
    assert _layout(vit.predictor) == [
        ("Linear", 4096, None), ("BatchNorm1d", None, True), ("ReLU", None, None),
        ("Linear", 256, None), ("BatchNorm1d", None, False),
    ]  # fmt: skip
    assert all(m.bias is None for m in [*vit.projector, *vit.predictor] if isinstance(m, nn.Linear))
    resnet = MoCoV3(tiny_backbone, dim=8, hidden=32, projector_layers=2, predictor_last_bn=False)
    assert _layout(resnet.projector) == [
        ("Linear", 32, None), ("BatchNorm1d", None, True), ("ReLU", None, None),
        ("Linear", 8, None), ("BatchNorm1d", None, False),
    ]  # fmt: skip
    assert _layout(resnet.predictor) == [
        ("Linear", 32, None), ("BatchNorm1d", None, True), ("ReLU", None, None),
        ("Linear", 8, None),
    ]  # fmt: skip
    heads = [*resnet.projector, *resnet.predictor]
    assert all(m.bias is None for m in heads if isinstance(m, nn.Linear))  # none, as the code


def _vit(**options):
    torch.manual_seed(0)
    config = {"name": "vit_tiny", "patch_size": 8, **options}
    return BACKBONES.build(config, in_channels=1, image_size=16)


def test_frozen_patch_projection_stays_at_its_initialisation_through_the_engine_optimizer():
    # the recipes' random patch projection (§4.2): the ViT's freeze_patch_embed
    method = MoCoV3(_vit(freeze_patch_embed=True), dim=8, hidden=16)
    config = OptimConfig(name="adamw", lr=1e-3, batch_size=8, weight_decay=0.1, warmup_epochs=0)
    optimizer = build_optimizer(method, config)
    schedule = Schedule(optimizer, config, steps_per_epoch=2, total_steps=4)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        views = Views([torch.randn(8, 1, 16, 16, generator=generator) for _ in range(2)])
        schedule.apply(step)
        progress = Progress(step, step / 2, step / 4)
        training_step(
            method, optimizer, views, progress, Precision("fp32", torch.device("cpu")),
            schedule=schedule,
        )  # fmt: skip
    after = method.state_dict()
    patch = [k for k in after if ".patch_embed." in k]  # online and momentum copies
    assert len(patch) == 4
    for key in patch:  # neither gradient, Adam momentum nor decoupled weight decay moved it
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(
        after["backbone.blocks.0.attn.qkv.weight"], before["backbone.blocks.0.attn.qkv.weight"]
    )
    assert not torch.equal(after["backbone.cls_token"], before["backbone.cls_token"])
    assert not torch.equal(after["projector.0.weight"], before["projector.0.weight"])


def test_invalid_parameters_name_the_recipe_key(tiny_backbone):
    with pytest.raises(ValueError, match="'method.temperature' must be > 0"):
        MoCoV3(tiny_backbone, temperature=0.0)
    with pytest.raises(ValueError, match=r"'method.momentum' must be in \[0, 1\]"):
        MoCoV3(tiny_backbone, momentum=1.5)


def test_moco_v3_training_lowers_the_loss_and_learns_features_above_chance(tiny_config):
    tiny_config["method"] = {
        "name": "moco_v3", "dim": 32, "hidden": 64, "projector_layers": 2,
        "predictor_last_bn": False, "momentum": 0.99, "temperature": 0.2,
    }  # fmt: skip
    tiny_config["views"] = {"name": "byol", "size": 16, "scale": [0.4, 1.0], "blur_p": 0.0}
    tiny_config["train"].update(epochs=4, knn_every=4)
    run = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    assert [r["knn_top1"] for r in run.metrics if "knn_top1" in r][-1] > 30  # chance: 10 %
