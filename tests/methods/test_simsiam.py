"""SimSiam: the loss formula, the stop-gradient, the heads, the fixed predictor lr, training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfsup
import selfsup.methods.simsiam
from selfsup.config import OptimConfig, resolve
from selfsup.engine.optim import Schedule, build_optimizer
from selfsup.methods.simsiam import SimSiam
from selfsup.step import Views


def _projections(method):
    """Capture the projector outputs z1, z2 of a forward pass, keeping their gradients."""
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = method.projector.register_forward_hook(keep)
    return captured, handle


def test_simsiam_loss_is_half_the_sum_of_both_negative_cosines(tiny_backbone, two_views, progress):
    method = SimSiam(tiny_backbone, dim=8, hidden=8, predictor_hidden=4)
    out = method(Views(two_views), progress)
    assert {"pos_sim", "z_std"} <= set(out)
    loss = out["loss"]
    with torch.no_grad():
        z1, z2 = (method.projector(method.backbone(x)) for x in two_views)
        p1, p2 = method.predictor(z1), method.predictor(z2)
    # L = ½D(p1, z2) + ½D(p2, z1), D(p, z) = −(p/‖p‖)·(z/‖z‖), batch mean (eq. 1, 2)
    d = lambda p, z: -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1).mean()  # noqa: E731
    torch.testing.assert_close(loss.detach(), 0.5 * d(p1, z2) + 0.5 * d(p2, z1))


def test_simsiam_stop_gradient_leaves_only_the_predictor_path_into_each_projection(
    tiny_backbone, two_views, progress, monkeypatch
):
    method = SimSiam(tiny_backbone, dim=8, hidden=8, predictor_hidden=4)
    targets = []
    original = selfsup.methods.simsiam.negative_cosine

    def record(prediction, target):
        targets.append(target)
        return original(prediction, target)

    monkeypatch.setattr(selfsup.methods.simsiam, "negative_cosine", record)
    captured, handle = _projections(method)
    method(Views(two_views), progress)["loss"].backward()
    handle.remove()
    z1, z2 = captured
    assert all(t.grad_fn is None and not t.requires_grad for t in targets)  # stopgrad(z)
    # ∂L/∂z1 comes only through p1 = h(z1): the same as the gradient of ½D(h(z1), const z2).
    z1_alone = z1.detach().requires_grad_()
    (0.5 * original(method.predictor(z1_alone), z2.detach())).backward()
    torch.testing.assert_close(z1.grad, z1_alone.grad)


def test_simsiam_heads_match_the_paper(tiny_backbone):
    method = SimSiam(tiny_backbone)  # defaults: 2048-d projection, 512-d predictor bottleneck
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    norms = [m for m in method.projector if isinstance(m, nn.BatchNorm1d)]
    assert [m.out_features for m in linears] == [2048, 2048, 2048]
    assert len(norms) == 3 and not norms[-1].affine  # BN on every fc, the output one too
    assert not isinstance(method.projector[-1], nn.ReLU)  # the output fc has no ReLU
    kinds = [type(m) for m in method.predictor]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [method.predictor[0].in_features, method.predictor[0].out_features] == [2048, 512]
    assert method.predictor[3].out_features == 2048


def test_simsiam_trains_the_predictor_at_a_fixed_learning_rate_unless_asked_not_to(
    tiny_backbone,
):
    # §4.4: the predictor keeps the base lr while the rest follows warm-up + cosine decay.
    config = OptimConfig(lr=0.05, batch_size=512, warmup_epochs=1)  # peak 0.05 × 512/256 = 0.1
    for fixed in (True, False):
        method = SimSiam(
            tiny_backbone, dim=8, hidden=8, predictor_hidden=4, fixed_predictor_lr=fixed
        )
        optimizer = build_optimizer(method, config)
        schedule = Schedule(optimizer, config, steps_per_epoch=10, total_steps=100)
        predictor = {id(p) for p in method.predictor.parameters()}
        for step in (0, 5, 40, 99):
            schedule.apply(step)
            warm = (
                0.1 * (step + 1) / 10
                if step < 10
                else 0.05 * (1 + math.cos(math.pi * (step - 10) / 90))
            )
            for group in optimizer.param_groups:
                in_predictor = {id(p) for p in group["params"]} <= predictor
                expected = 0.1 if fixed and in_predictor else warm
                assert group["lr"] == pytest.approx(expected), (fixed, step, group["name"])


def test_simsiam_training_lowers_the_loss_and_learns_features_above_chance(tiny_config):
    tiny_config["method"] = {"name": "simsiam", "dim": 64, "hidden": 64, "predictor_hidden": 16}
    tiny_config["views"] = {"name": "simsiam", "size": 16, "blur_p": 0.0}
    tiny_config["optim"].update(lr=1.0, warmup_epochs=0)
    tiny_config["train"].update(epochs=4, knn_every=4)
    run = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.15  # from ≈ 0 towards −1
    assert [r["knn_top1"] for r in run.metrics if "knn_top1" in r][-1] > 30  # chance: 10 %
