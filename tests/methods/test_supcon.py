"""SupCon: the loss against eq. 2 by hand, its reduction to NT-Xent with one positive per anchor,
labels as positives in the method, training on labelled data."""

import math

import torch
import torch.nn.functional as F

import selfsup
from selfsup.config import resolve
from selfsup.losses import nt_xent, supervised_contrastive
from selfsup.methods.supcon import SupCon
from selfsup.step import Views


def supcon_by_hand(z, labels, temperature):
    """L^sup_out one anchor at a time, in float64 (Khosla et al. 2020, eq. 2)."""
    z = F.normalize(z.double(), dim=1)
    m = z.shape[0]
    total = 0.0
    for i in range(m):
        denominator = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in range(m) if a != i)
        positives = [p for p in range(m) if p != i and labels[p] == labels[i]]
        if positives:
            total += -sum(
                math.log(math.exp(float(z[i] @ z[p]) / temperature) / denominator)
                for p in positives
            ) / len(positives)
    return total / m


def test_supcon_loss_equals_equation_2_by_hand_including_an_anchor_without_positives():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=generator)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # class 2 and 3: one view each, no positive
    loss = supervised_contrastive(z, labels, temperature=0.3)
    assert math.isclose(loss.item(), supcon_by_hand(z, labels, 0.3), rel_tol=1e-5)


def test_supcon_with_one_positive_per_anchor_is_nt_xent():
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 6, 8, generator=generator)
    distinct = torch.arange(6).repeat(2)  # each image its own class: only its other view matches
    loss = supervised_contrastive(torch.cat([z1, z2]), distinct, temperature=0.2)
    torch.testing.assert_close(loss, nt_xent(z1, z2, temperature=0.2))


def test_supcon_method_makes_every_same_class_view_a_positive(tiny_backbone, two_views, progress):
    method = SupCon(tiny_backbone, dim=4, hidden=16, temperature=0.1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    out = method(Views(two_views, labels=labels), progress)
    with torch.no_grad():
        z = method.projector(method.backbone(torch.cat(two_views)))
    expected = supcon_by_hand(z, labels.repeat(2), 0.1)
    assert math.isclose(out["loss"].item(), expected, rel_tol=1e-5)
    # The labels matter: with every image its own class it would be NT-Xent, another value
    # (by far more than float error; the untrained embeddings are close to each other).
    assert abs(out["loss"].item() - nt_xent(*z.chunk(2), 0.1).item()) > 1e-3


def test_supcon_trains_on_labelled_data(tiny_config):
    tiny_config["method"] = {"name": "supcon", "dim": 16, "hidden": 32}
    tiny_config["train"].update(max_steps=3, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
