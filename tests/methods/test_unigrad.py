"""UniGrad: autograd's gradient equals the paper's closed form −u⁺ + λ·F·u, the moving correlation
matrix F of the momentum embeddings, the momentum target, training with F in the checkpoint
(its exact resume: the contract test)."""

import math

import numpy as np
import torch
import torch.nn.functional as F

import selfsup
from selfsup.config import resolve
from selfsup.losses import unigrad
from selfsup.methods.unigrad import UniGrad
from selfsup.step import Progress, Views


def test_unigrad_gradient_is_minus_the_target_plus_lambda_f_u():
    generator = torch.Generator().manual_seed(0)
    n, d, balance = 5, 4, 3.0
    u = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)
    target = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)
    others = F.normalize(torch.randn(9, d, generator=generator, dtype=torch.float64), dim=1)
    correlation = sum(torch.outer(v, v) for v in others) / len(others)  # F = Σ_v ρ_v v vᵀ
    u.requires_grad_(True)
    unigrad(u, target, correlation, balance).backward()
    for i in range(n):  # ∂L/∂u_i of the batch mean: (−u⁺_i + λ·F·u_i) / N, sample by sample
        closed_form = (-target[i] + balance * (correlation @ u[i].detach())) / n
        torch.testing.assert_close(u.grad[i], closed_form)


def momentum_embeddings(method, x1, x2):
    with torch.no_grad():
        return [F.normalize(method.target(x), dim=1) for x in (x1, x2)]


def correlation_by_hand(embeddings):
    rows = torch.cat(embeddings).double()
    return sum(torch.outer(v, v) for v in rows) / rows.shape[0]  # mean of v vᵀ over 2N


def test_unigrad_correlation_starts_at_the_first_batch_then_moves_with_rho(
    tiny_backbone, two_views, progress
):
    method = UniGrad(tiny_backbone, dim=4, hidden=16, correlation_momentum=0.9, momentum=1.0)
    first = method(Views(two_views), progress)
    expected = correlation_by_hand(momentum_embeddings(method, *two_views))
    torch.testing.assert_close(first["correlation"][0].double(), expected, rtol=1e-5, atol=1e-6)
    assert not method.correlation_started  # forward changes no state; after_step stores F
    method.after_step(progress, first)
    generator = torch.Generator().manual_seed(5)
    new_views = [torch.randn(6, 1, 8, 8, generator=generator) for _ in range(2)]
    second = method(Views(new_views), Progress(1, 0.1, 0.1))
    batch = correlation_by_hand(momentum_embeddings(method, *new_views))
    torch.testing.assert_close(
        second["correlation"][0].double(), 0.9 * expected + 0.1 * batch, rtol=1e-5, atol=1e-6
    )


def test_unigrad_loss_uses_the_momentum_target_of_the_other_view(
    tiny_backbone, two_views, progress
):
    method = UniGrad(tiny_backbone, dim=4, hidden=16, balance=2.0)
    out = method(Views(two_views), progress)
    with torch.no_grad():
        u1, u2 = (F.normalize(method.projector(method.backbone(x)), dim=1) for x in two_views)
    t1, t2 = momentum_embeddings(method, *two_views)
    f = out["correlation"][0]
    by_hand = 0.0
    for u, t in ((u1, t2), (u2, t1)):  # −u·u⁺ + λ/2·uᵀFu, averaged over the batch, symmetrised
        by_hand += 0.5 * np.mean([float(-u[i] @ t[i] + 1.0 * u[i] @ f @ u[i]) for i in range(6)])
    assert math.isclose(out["loss"].item(), by_hand, rel_tol=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in method.target.parameters())  # the target is not trained
    assert method.backbone.conv.weight.grad.abs().sum() > 0


def test_unigrad_trains_and_checkpoints_its_correlation_matrix(tiny_config):
    tiny_config["method"] = {"name": "unigrad", "dim": 16, "hidden": 32, "momentum": 0.9}
    tiny_config["train"].update(max_steps=4, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    state = run.checkpoint()["method"]
    assert bool(state["correlation_started"])
    f = state["correlation"]
    torch.testing.assert_close(f, f.T)  # a correlation matrix: symmetric, trace 1 (unit rows)
    assert math.isclose(f.trace().item(), 1.0, rel_tol=1e-4)
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
