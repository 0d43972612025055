"""BYOL: the symmetrised regression loss, the EMA target on its cosine schedule, training."""

import math

import numpy as np
import torch
import torch.nn.functional as F

import selfsup
from selfsup.config import resolve
from selfsup.methods.byol import BYOL
from selfsup.step import Progress, Views
from selfsup.target import use_stop_gradient_targets


def test_byol_loss_is_the_symmetrised_2_minus_2_cos_between_prediction_and_target(
    tiny_backbone, two_views, progress
):
    method = BYOL(tiny_backbone, dim=4, hidden=16)
    out = method(Views(two_views), progress)
    assert {"pos_sim", "z_std"} <= set(out)
    loss = out["loss"]
    x1, x2 = two_views
    with torch.no_grad():
        p1, p2 = (method.predictor(method.projector(method.backbone(x))) for x in (x1, x2))
        t1, t2 = method.target(x1), method.target(x2)
    expected = 0.0
    for p, t in ((p1, t2), (p2, t1)):  # L + L̃, each ||p̄ − z̄'||² averaged over the batch
        expected += ((F.normalize(p, dim=1) - F.normalize(t, dim=1)) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_byol_target_gets_no_gradient_and_follows_the_cosine_momentum(tiny_backbone, two_views):
    method = BYOL(tiny_backbone, dim=4, hidden=16, momentum=0.9)
    target_weight = method.target.copies[0].conv.weight.clone()  # copies: (backbone, projector)
    progress = Progress(step=5, epoch=0.5, fraction=0.25)
    out = method(Views(two_views), progress)
    out["loss"].backward()
    assert all(p.grad is None for p in method.target.parameters())
    torch.optim.SGD(method.parameters(), lr=1.0).step()
    with torch.no_grad():
        method.after_step(progress, out)
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * 0.25) + 1) / 2  # BYOL §3.2, at k/K = 0.25
    expected = tau * target_weight + (1 - tau) * method.backbone.conv.weight
    torch.testing.assert_close(method.target.copies[0].conv.weight, expected)


def test_byol_target_is_frozen_at_the_end_of_training(tiny_backbone, two_views):
    method = BYOL(tiny_backbone, dim=4, hidden=16)
    before = [p.clone() for p in method.target.parameters()]
    with torch.no_grad():
        method.backbone.conv.weight.add_(1.0)
        method.after_step(Progress(step=99, epoch=9.9, fraction=1.0), {})  # τ = 1
    assert all(torch.equal(a, b) for a, b in zip(before, method.target.parameters(), strict=True))


def test_stop_gradient_switch_makes_byol_target_exactly_the_online_network(
    tiny_backbone, two_views, progress
):
    method = BYOL(tiny_backbone, dim=4, hidden=16)
    online_keys = {k for k in method.state_dict() if not k.startswith("target.")}
    use_stop_gradient_targets(method)
    assert set(method.state_dict()) == online_keys  # no separate target weights
    assert list(method.target.parameters()) == []
    x = two_views[0]
    with torch.no_grad():
        torch.testing.assert_close(
            method.target(x), method.projector(method.backbone(x)), rtol=0, atol=0
        )
    out = method(Views(two_views), progress)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_byol_training_lowers_the_loss_and_learns_features_above_chance(tiny_config):
    tiny_config["method"] = {"name": "byol", "dim": 32, "hidden": 64, "momentum": 0.99}
    tiny_config["views"] = {"name": "byol", "size": 16}
    tiny_config["train"].update(epochs=4, knn_every=4)
    run = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    assert [r["knn_top1"] for r in run.metrics if "knn_top1" in r][-1] > 30  # chance: 10 %


def test_train_target_stop_gradient_trains_byol_without_target_weights_and_reloads(tiny_config):
    tiny_config["method"] = {"name": "byol", "dim": 16, "hidden": 32}
    tiny_config["train"].update(max_steps=2, knn_every=0, target="stop_gradient")
    run = selfsup.train(resolve(tiny_config))
    assert not any(key.startswith("target.") for key in run.checkpoint()["method"])
    method = selfsup.load(run.path).method  # a strict load into a method built the same way
    assert method.target.shares_online and list(method.target.parameters()) == []
