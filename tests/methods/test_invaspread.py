"""InvaSpread: both loss terms by hand, the spreading term's presence, the code's detached keys,
the method's loss from its features, real backbones, training."""

import math

import numpy as np
import torch
import torch.nn.functional as F

import selfsup
from selfsup.config import resolve
from selfsup.losses import invariant_spreading, nt_xent
from selfsup.methods.invaspread import InvaSpread
from selfsup.step import Views


def _unit(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Three instances with 2-d unit features: f_i (first view) and f̂_i (second view).
F1 = torch.tensor([_unit(0), _unit(100), _unit(200)])
F2 = torch.tensor([_unit(30), _unit(120), _unit(250)])


def _by_hand(f, f_hat, tau, spreading=True):
    """-1/(2N) Σ_a [log P(a⁺|a) + Σ_{b≠a,a⁺} log(1 − P(b|a))], P over the other 2N − 1 views."""
    x = f.tolist() + f_hat.tolist()
    n2 = len(x)
    total = 0.0
    for a in range(n2):
        partner = (a + n2 // 2) % n2
        dots = [sum(u * v for u, v in zip(x[a], x[b], strict=True)) for b in range(n2)]
        e = {b: math.exp(dots[b] / tau) for b in range(n2)}
        denominator = sum(e[b] for b in range(n2) if b != a)
        total += math.log(e[partner] / denominator)  # invariance: P(i|x̂_i)
        if spreading:
            for b in range(n2):
                if b not in (a, partner):
                    total += math.log(1 - e[b] / denominator)  # spreading: P(not i|x_j)
    return -total / n2


def test_loss_is_both_terms_on_three_hand_made_instances():
    loss = invariant_spreading(torch.cat([F1, F2]), torch.cat([F1, F2]), 0.5)
    assert math.isclose(loss.item(), _by_hand(F1, F2, 0.5), rel_tol=1e-5)


def test_spreading_term_is_present_beyond_the_softmax_of_the_positive():
    loss = invariant_spreading(torch.cat([F1, F2]), torch.cat([F1, F2]), 0.5)
    positive_only = nt_xent(F1, F2, 0.5)  # -mean log P(a⁺|a): the invariance term alone
    assert math.isclose(positive_only.item(), _by_hand(F1, F2, 0.5, spreading=False), rel_tol=1e-5)
    spreading = _by_hand(F1, F2, 0.5) - _by_hand(F1, F2, 0.5, spreading=False)
    assert spreading > 0.1
    assert math.isclose((loss - positive_only).item(), spreading, rel_tol=1e-4)


def test_loss_changes_when_only_the_negatives_move():
    # turning instance 3's two views together keeps every positive pair's similarity
    turned = (F1.clone(), F2.clone())
    turned[0][2], turned[1][2] = torch.tensor(_unit(140)), torch.tensor(_unit(190))
    for a, b in [(F1, F2), turned]:
        assert math.isclose((a[2] @ b[2]).item(), math.cos(math.radians(50)), rel_tol=1e-5)
    before = invariant_spreading(torch.cat([F1, F2]), torch.cat([F1, F2]), 0.5)
    after = invariant_spreading(torch.cat(turned), torch.cat(turned), 0.5)
    assert abs(before.item() - after.item()) > 1e-3
    assert math.isclose(after.item(), _by_hand(*turned, 0.5), rel_tol=1e-5)


def test_keys_carry_no_gradient_by_default_as_in_the_official_code(tiny_backbone, two_views):
    x = torch.cat([F1, F2]).requires_grad_()
    detached = torch.autograd.grad(invariant_spreading(x, x.detach(), 0.5), x)[0]
    full = torch.autograd.grad(invariant_spreading(x, x, 0.5), x)[0]
    assert not torch.allclose(detached, full)
    method = InvaSpread(tiny_backbone, dim=4)
    assert not method.key_gradient


def test_method_loss_is_the_loss_of_both_views_features(tiny_backbone, two_views, progress):
    method = InvaSpread(tiny_backbone, dim=4, temperature=0.1)
    out = method(Views(two_views), progress)
    with torch.no_grad():
        h = method.backbone(torch.cat(two_views))  # one batch norm batch, as in the method
        f, f_hat = F.normalize(method.projector(h), dim=1).chunk(2)
    assert math.isclose(out["loss"].item(), _by_hand(f, f_hat, 0.1), rel_tol=1e-4)
    assert "pos_sim" in out
    out["loss"].backward()
    assert method.backbone.conv.weight.grad.abs().sum() > 0


def test_invaspread_training_lowers_the_loss_and_learns_features_above_chance(tiny_config):
    tiny_config["method"] = {"name": "invaspread", "dim": 32, "temperature": 0.1}
    tiny_config["views"] = {"name": "moco_v1", "size": 16, "scale": [0.4, 1.0]}
    tiny_config["train"].update(epochs=4, knn_every=4)
    run = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    assert [r["knn_top1"] for r in run.metrics if "knn_top1" in r][-1] > 30  # chance: 10 %
