"""SwAV: Sinkhorn-Knopp codes and their marginals, the swapped prediction loss, codes from the
large crops only, the prototypes' unit norm and frozen first epoch, the feature queue, and the
Sinkhorn sums all-reduced over processes."""

import math

import pytest
import torch
import torch.nn.functional as F
from gloo import run_on_processes

import selfsup.methods.swav as swav_module
from selfsup import dist
from selfsup.config import OptimConfig, load_config
from selfsup.engine.accumulate import Accumulation
from selfsup.engine.optim import Schedule, build_optimizer
from selfsup.engine.step import Precision, training_step
from selfsup.losses import swapped_prediction
from selfsup.methods.swav import SwAV
from selfsup.prototypes import Prototypes, sinkhorn
from selfsup.step import Progress, Views
from tests.methods.conftest import TinyBackbone

SMALL = {"dim": 4, "hidden": 16, "num_prototypes": 5}


def _crops(large=2, small=2, n=6, seed=1):
    """`large` 8-px crops and `small` 4-px crops of n one-channel images."""
    generator = torch.Generator().manual_seed(seed)
    return Views(
        [torch.randn(n, 1, 8, 8, generator=generator) for _ in range(large)],
        [torch.randn(n, 1, 4, 4, generator=generator) for _ in range(small)],
    )


def _cosines(b, k, seed=0):
    """Scores of b unit embeddings against k unit prototypes, (b, k)."""
    generator = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, 8, generator=generator), dim=1)
    c = F.normalize(torch.randn(k, 8, generator=generator), dim=1)
    return z @ c.T


def _codes_by_scaling(scores, epsilon=0.05, iterations=3):
    """Eq. 3's solution in Cuturi's scaling form, written independently, in float64:
    Q = Diag(u) P Diag(v) with P = exp(CᵀZ/ε) (K × B); each iteration sets u so that every
    prototype (row) sums to 1/K, then v so that every sample (column) sums to 1/B. Codes B·Qᵀ."""
    p = (scores.double().T / epsilon).exp()
    k, b = p.shape
    v = torch.ones(b, dtype=torch.float64)
    for _ in range(iterations):
        u = 1 / (k * (p @ v))
        v = 1 / (b * (p.T @ u))
    return (b * u[:, None] * p * v[None, :]).T


def _scores(method, crops):
    """z_v·c_k of every crop, one crop at a time (eval mode: BN does not mix the crops)."""
    c = method.prototypes.weight
    return [F.normalize(method.projector(method.backbone(x)), dim=1) @ c.T for x in crops]


def _ell(scores_v, code_i, temperature=0.1):
    """ℓ(z_v, q_i) = −mean_n Σ_k q_ik log softmax(s_v / τ)_k (eq. 2), in float64."""
    log_p = F.log_softmax(scores_v.double() / temperature, dim=1)
    return -(code_i.double() * log_p).sum(dim=1).mean()


def _swapped(scores, codes, temperature=0.1):
    """1/G Σ_i 1/(V − 1) Σ_{v≠i} ℓ(z_v, q_i): every crop against the codes of the others."""
    views = len(scores)
    per_code = [sum(_ell(scores[v], codes[i], temperature) for v in range(views) if v != i)
                / (views - 1) for i in range(len(codes))]  # fmt: skip
    return sum(per_code) / len(codes)


@pytest.fixture
def recorded(monkeypatch):
    """The inputs and outputs of every Sinkhorn call the method makes."""
    calls = []

    def recording(scores, epsilon, iterations, global_batch):
        codes = sinkhorn(scores, epsilon, iterations, global_batch)
        calls.append((scores.detach().clone(), codes))
        return codes

    monkeypatch.setattr(swav_module, "sinkhorn", recording)
    return calls


def test_sinkhorn_codes_sum_to_one_per_sample_and_share_prototypes_equally_when_converged():
    scores = _cosines(12, 4)
    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert codes.shape == (12, 4) and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12))  # columns scaled last: exact
    # ε 0.5 keeps the problem smooth enough to converge in a few hundred iterations
    converged = sinkhorn(scores, epsilon=0.5, iterations=500)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((4,), 12 / 4))  # B/K each
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(12))
    assert not torch.allclose(codes.sum(dim=0), torch.full((4,), 3.0), atol=1e-3)  # 3 are not


def test_three_sinkhorn_iterations_equal_alternate_row_and_column_scaling_by_hand():
    scores = _cosines(10, 7, seed=3)  # B and K unequal: rows and columns not interchangeable
    torch.testing.assert_close(
        sinkhorn(scores, 0.05, 3).double(), _codes_by_scaling(scores, 0.05, 3), rtol=1e-5, atol=1e-7
    )
    one = sinkhorn(scores, 0.05, 1).double()
    assert not torch.allclose(one, _codes_by_scaling(scores, 0.05, 3), atol=1e-3)


def test_sinkhorn_runs_in_float32_without_gradient_under_autocast():
    scores = _cosines(6, 3).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn(scores.bfloat16(), 0.05, 3)
    assert codes.dtype == torch.float32 and not codes.requires_grad


def test_swapped_prediction_loss_on_a_hand_computed_case():
    tau = 0.1
    # softmax(s/τ): crop 0 → (1/4, 3/4), crops 1 and 2 → (1/2, 1/2)
    scores = [torch.tensor([[0.0, tau * math.log(3)]]), torch.zeros(1, 2), torch.zeros(1, 2)]
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]  # of crops 0 and 1
    # two crops: ½[ℓ(z_1, q_0) + ℓ(z_0, q_1)] = ½[log 2 + ½(log 4 + log 4/3)]
    two = 0.5 * (math.log(2) + 0.5 * (math.log(4) + math.log(4 / 3)))
    assert swapped_prediction(scores[:2], codes, tau).item() == pytest.approx(two, rel=1e-6)
    # a third (small) crop predicts both codes: ℓ(z_2, q_0) = ℓ(z_2, q_1) = log 2, and each code's
    # two predictions are averaged: ½[½(log 2 + log 2) + ½(½(log 4 + log 4/3) + log 2)]
    three = 0.5 * (math.log(2) + 0.5 * (0.5 * (math.log(4) + math.log(4 / 3)) + math.log(2)))
    assert swapped_prediction(scores, codes, tau).item() == pytest.approx(three, rel=1e-6)


def test_codes_come_from_the_large_crops_and_each_crop_predicts_the_other_large_crops_codes(
    tiny_backbone, recorded
):
    method = SwAV(tiny_backbone, **SMALL).eval()  # eval: each crop alone = all crops together
    views = _crops(large=2, small=2)
    loss = method(views, Progress(0, 0.0, 0.0))["loss"]
    with torch.no_grad():
        scores = _scores(method, views.large + views.small)
    assert len(recorded) == 2  # one Sinkhorn problem per large crop, none for the small ones
    for (seen, _), large in zip(recorded, scores[:2], strict=True):
        torch.testing.assert_close(seen, large)
    codes = [_codes_by_scaling(s) for s in scores[:2]]
    torch.testing.assert_close(loss.detach().double(), _swapped(scores, codes), rtol=1e-5, atol=0)
    # a crop never predicts its own code: including those pairs gives another number
    with_own = sum(_ell(scores[v], codes[i]) for i in range(2) for v in range(4)) / 8
    assert abs(loss.item() - with_own.item()) > 1e-3


def test_the_codes_carry_no_gradient_so_the_loss_treats_them_as_constants(tiny_backbone, recorded):
    method = SwAV(tiny_backbone, **SMALL).eval()
    views = _crops(large=2, small=1)
    method(views, Progress(0, 0.0, 0.0))["loss"].backward()
    assert all(not codes.requires_grad for _, codes in recorded)
    got = method.backbone.conv.weight.grad.clone()

    def gradient(detach_codes):
        method.zero_grad()
        scores = _scores(method, views.large + views.small)
        codes = [_codes_by_scaling(s.detach() if detach_codes else s) for s in scores[:2]]
        _swapped(scores, codes).backward()
        return method.backbone.conv.weight.grad.clone()

    torch.testing.assert_close(got, gradient(detach_codes=True).float(), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(got, gradient(detach_codes=False).float(), atol=1e-5)  # teeth


def test_prototypes_are_unit_vectors_at_construction_and_after_each_step(tiny_backbone):
    method = SwAV(tiny_backbone, **SMALL, freeze_prototypes_epochs=0)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(5))
    progress = Progress(0, 0.0, 0.0)
    out = method(_crops(), progress)
    out["loss"].backward()
    torch.optim.SGD(method.parameters(), lr=5.0).step()
    assert (method.prototypes.weight.norm(dim=1) - 1).abs().max() > 1e-3  # the step moved them
    with torch.no_grad():
        method.after_step(progress, out)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(5))


def test_prototypes_do_not_move_during_the_first_epoch_then_train(tiny_backbone):
    method = SwAV(tiny_backbone, **SMALL)  # freeze_prototypes_epochs=1
    config = OptimConfig(name="sgd", lr=0.5, weight_decay=0.1, warmup_epochs=0)
    optimizer = build_optimizer(method, config)
    schedule = Schedule(optimizer, config, steps_per_epoch=2, total_steps=10)
    prototypes = method.prototypes.weight.detach().clone()
    first = method.projector[0].weight.detach().clone()
    views = _crops()

    def step(k):
        schedule.apply(k)
        precision = Precision("fp32", torch.device("cpu"))
        training_step(
            method, optimizer, views, Progress(k, k / 2, k / 10), precision, None, schedule
        )

    for k in range(2):  # the first epoch
        step(k)
    # no gradient, momentum or decay reached them; only the renormalisation's last-bit rounding
    torch.testing.assert_close(method.prototypes.weight, prototypes, rtol=0, atol=1e-6)
    assert method.prototypes.weight not in optimizer.state
    assert not torch.equal(method.projector[0].weight, first)
    step(2)
    assert (method.prototypes.weight - prototypes).abs().max() > 1e-4
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(5))


def test_queue_fills_from_queue_start_epoch_and_its_rows_enter_sinkhorn_but_not_the_loss(
    tiny_backbone, recorded
):
    method = SwAV(tiny_backbone, **SMALL, queue_size=12, queue_start_epoch=1).eval()
    views = _crops(large=2, small=1, n=6)
    earlier = [_crops(large=2, small=1, n=6, seed=seed) for seed in (2, 3, 4)]  # other batches
    keys = [q.keys.clone() for q in method.queues]

    def step(batch, progress):
        recorded.clear()
        out = method(batch, progress)
        with torch.no_grad():
            method.after_step(progress, out)
        return out

    out = step(earlier[0], Progress(1, 0.5, 0.05))  # before the start epoch: nothing queued
    assert method.queued.item() == 0 and out["queue_in_use"].item() == 0
    assert all(torch.equal(q.keys, k) for q, k in zip(method.queues, keys, strict=True))
    for k, batch in ((2, earlier[1]), (3, earlier[2])):  # epochs 1.0 and 1.5: 2 × 6 rows
        out = step(batch, Progress(k, k / 2, k / 10))
        assert out["queue_in_use"].item() == 0  # not full yet: Sinkhorn sees the batch only
        assert [seen.shape for seen, _ in recorded] == [(6, 5), (6, 5)]
    assert method.queued.item() == 12
    with torch.no_grad():  # each large crop's queue holds its projections, oldest first
        for i, queue_ in enumerate(method.queues):
            z = [F.normalize(method.projector(method.backbone(b.large[i])), dim=1)
                 for b in earlier[1:]]  # fmt: skip
            torch.testing.assert_close(queue_.keys, torch.cat(z))

    recorded.clear()
    out = method(views, Progress(4, 2.0, 0.4))
    assert out["queue_in_use"].item() == 1
    with torch.no_grad():
        scores = _scores(method, views.large + views.small)
        queued = [q.keys @ method.prototypes.weight.T for q in method.queues]
    codes = []
    for (seen, code), s, q in zip(recorded, scores[:2], queued, strict=True):
        torch.testing.assert_close(
            seen, torch.cat([q, s])
        )  # 12 queue rows, then the 6 of the batch
        assert code.shape == (18, 5)
        codes.append(_codes_by_scaling(torch.cat([q, s]))[-6:])  # the loss takes the batch's only
    torch.testing.assert_close(out["loss"].double(), _swapped(scores, codes), rtol=1e-5, atol=0)
    without_queue = _swapped(scores, [_codes_by_scaling(s) for s in scores[:2]])
    assert abs(out["loss"].item() - without_queue.item()) > 1e-4  # the queue changed the codes


def test_a_queue_needs_exactly_two_large_crops(tiny_backbone):
    method = SwAV(tiny_backbone, **SMALL, queue_size=12)
    with pytest.raises(ValueError, match="queue_size=0"):
        method(_crops(large=3), Progress(0, 0.0, 0.0))


def test_prototypes_layer_scores_are_cosines_to_unit_prototypes():
    torch.manual_seed(0)
    layer = Prototypes(8, 20)
    z = F.normalize(torch.randn(3, 8), dim=1)
    scores = layer(z)
    assert scores.shape == (3, 20) and scores.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(scores, F.cosine_similarity(z[:, None], layer.weight[None], dim=2))


def test_swav_runs_multi_crop_with_a_queue_on_resnet_and_vit_backbones(real_backbone):
    method = SwAV(real_backbone, dim=8, hidden=16, num_prototypes=6, queue_size=4,
                  queue_start_epoch=0)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    views = Views(
        [torch.randn(4, 1, 16, 16, generator=generator) for _ in range(2)],
        [torch.randn(4, 1, 8, 8, generator=generator) for _ in range(2)],
    )
    for step in range(2):  # one batch of 4 fills the queue: the second step uses it
        progress = Progress(step, float(step), step / 2)
        out = method(views, progress)
        out["loss"].backward()
        with torch.no_grad():
            method.after_step(progress, out)
    assert out["queue_in_use"].item() == 1 and torch.isfinite(out["loss"])
    assert 0 < out["code_entropy"] <= math.log(6) + 1e-4
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in real_backbone.parameters())


RECIPES = ["cifar10", "fashion_mnist", "imagenet", "imagenet_bs256"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_swav_recipes_resolve_and_build(recipe, tiny_backbone):
    config = load_config(f"swav/{recipe}")
    settings = {key: value for key, value in config.method.items() if key != "name"}
    method = SwAV(tiny_backbone, **settings)
    assert method.prototypes.weight.shape == (settings["num_prototypes"], settings["dim"])
    assert (method.queues is None) == (settings["queue_size"] == 0)


# Sinkhorn over two real gloo processes with unequal batches equals Sinkhorn over all rows.
ROWS = (5, 7)


def _sinkhorn_on_each_process(rank, scores):
    start = sum(ROWS[:rank])
    return {"codes": sinkhorn(scores[start : start + ROWS[rank]], 0.05, 3).tolist()}


@pytest.mark.slow
def test_sinkhorn_sums_over_all_processes_as_one_problem_on_the_global_batch():
    scores = _cosines(sum(ROWS), 4, seed=5)
    outputs = run_on_processes(_sinkhorn_on_each_process, 2, scores)
    together = torch.cat([torch.tensor(outputs[r]["codes"]) for r in range(2)])
    torch.testing.assert_close(together, sinkhorn(scores, 0.05, 3))
    torch.testing.assert_close(together.double(), _codes_by_scaling(scores), rtol=1e-5, atol=1e-7)


# The queue after training steps: each sample's projection of each large crop, once, in sample
# order, the oldest rows overwritten first; with train.accumulate and on several processes.
QUEUED_BATCH = 8  # the global batch of each step
QUEUED = {**SMALL, "queue_size": 12, "queue_start_epoch": 0, "freeze_prototypes_epochs": 0}


def _queue_after_two_steps(rank: int, world: int, micro_batches: int) -> dict:
    """Two training steps of a queued SwAV, each on this process's 1/world of a fixed global
    batch in `micro_batches` micro-batches: the queues' rows oldest first, and each step's
    projections of every sample of the global batch (per large crop), computed directly with
    the weights of that step. Eval mode: a sample's projection does not depend on its batch."""
    torch.manual_seed(0)
    method = SwAV(TinyBackbone(), **QUEUED).eval()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    model = dist.data_parallel(method, torch.device("cpu"))
    mine = slice(rank * QUEUED_BATCH // world, (rank + 1) * QUEUED_BATCH // world)
    projections = []
    for step in range(2):
        views = _crops(large=2, small=1, n=QUEUED_BATCH, seed=10 + step)
        with torch.no_grad():
            z = [F.normalize(method.projector(method.backbone(x)), dim=1) for x in views.large]
        projections.append([crop.tolist() for crop in z])
        part = Views([x[mine] for x in views.large], [x[mine] for x in views.small])
        training_step(
            method, optimizer, part, Progress(step, step / 2, step / 4),
            Precision("fp32", torch.device("cpu")), model=model,
            accumulation=Accumulation(micro_batches),
        )  # fmt: skip
    return {
        "queues": [q.keys.roll(-int(q.ptr), dims=0).tolist() for q in method.queues],
        "queued": int(method.queued),
        "projections": projections,
    }


def _assert_queue_holds_the_newest_rows_of_both_steps(result: dict) -> None:
    assert result["queued"] == 12
    for crop, queue in enumerate(result["queues"]):
        # 16 rows pushed into 12 slots: step 0's samples 4..7, then step 1's samples 0..7
        rows = [torch.tensor(step[crop]) for step in result["projections"]]
        torch.testing.assert_close(torch.tensor(queue), torch.cat(rows)[-12:])


def test_queue_takes_each_samples_rows_once_per_step_in_order_with_micro_batches():
    _assert_queue_holds_the_newest_rows_of_both_steps(_queue_after_two_steps(0, 1, 4))


def _queues_on_two_processes(rank: int) -> dict:
    torch.set_num_threads(1)  # two processes on the test machine's cores
    return {m: _queue_after_two_steps(rank, 2, m) for m in (1, 2)}


@pytest.mark.slow  # spawns processes
def test_queue_takes_each_samples_rows_once_per_step_in_order_on_two_processes():
    per_process = run_on_processes(_queues_on_two_processes, 2)
    for rank in range(2):
        for micro_batches in (1, 2):  # alone, and with train.accumulate on each process
            _assert_queue_holds_the_newest_rows_of_both_steps(per_process[rank][micro_batches])
