"""Shared mechanisms against their formulas: EMA target, key queue, shuffled BN, stop-gradient."""

import math

import pytest
import torch
import torch.nn.functional as F
from gloo import run_on_processes
from torch import nn

from selfsup.dist import shuffled
from selfsup.negatives import Queue
from selfsup.schedules import cosine_ramp
from selfsup.target import EMA, use_stop_gradient_targets

# --- EMA target -------------------------------------------------------------------------------


def test_ema_matches_hand_computed_moving_average_after_several_updates():
    torch.manual_seed(0)
    online = nn.Linear(3, 2)
    target = EMA(online)
    expected = online.weight.detach().clone()  # the copy starts equal to the online weights
    for step, momentum in enumerate([0.9, 0.5, 0.99, 0.0, 0.7]):
        with torch.no_grad():
            online.weight.copy_(torch.full((2, 3), float(step + 1)))  # a known online weight
        target.update(momentum)
        expected = momentum * expected + (1 - momentum) * (step + 1)  # θ_t ← m·θ_t + (1 − m)·θ_o
        torch.testing.assert_close(target.copies[0].weight, expected)
    # Five updates in closed form: the last momentum is 0.7, the one before it 0 (a full copy).
    torch.testing.assert_close(target.copies[0].weight, torch.full((2, 3), 0.7 * 4 + 0.3 * 5))


def test_ema_with_momentum_one_keeps_the_target_unchanged():
    online = nn.Linear(3, 2)
    target = EMA(online)
    before = target.copies[0].weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    target.update(1.0)
    assert torch.equal(target.copies[0].weight, before)


def test_ema_copies_buffers_from_the_online_modules():
    online = nn.BatchNorm1d(4)
    target = EMA(online)
    online(torch.randn(8, 4) * 3 + 1)  # train mode: moves the online running statistics
    target.update(0.99)
    assert torch.equal(target.copies[0].running_mean, online.running_mean)
    assert torch.equal(target.copies[0].running_var, online.running_var)
    assert target.copies[0].num_batches_tracked.item() == 1


def test_ema_runs_its_copies_in_sequence():
    first, second = nn.Linear(3, 5), nn.Linear(5, 2)
    target = EMA(first, second)
    x = torch.randn(4, 3)
    torch.testing.assert_close(target(x), second(first(x)))


def test_ema_target_receives_no_gradient():
    online = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    target = EMA(online)
    x = torch.randn(6, 3, requires_grad=True)
    out = target(x)
    assert not out.requires_grad
    loss = (online(x) - out).pow(2).sum()
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in online.parameters())


def test_ema_holds_online_modules_without_registering_them():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(3, 2)
            self.target = EMA(self.encoder)

    model = Model()
    assert sorted(model.state_dict()) == [
        "encoder.bias", "encoder.weight", "target.copies.0.bias", "target.copies.0.weight",
    ]  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2  # only the online weights are trained


def test_cosine_ramp_takes_the_byol_momentum_from_0996_to_1():
    assert cosine_ramp(0.996, 1.0, 0.0) == pytest.approx(0.996)
    assert cosine_ramp(0.996, 1.0, 0.5) == pytest.approx(0.998)
    assert cosine_ramp(0.996, 1.0, 1.0) == pytest.approx(1.0)
    # BYOL §3.2: τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2
    tau = 1 - (1 - 0.996) * (math.cos(math.pi * 0.25) + 1) / 2
    assert cosine_ramp(0.996, 1.0, 0.25) == pytest.approx(tau)


# --- stop-gradient switch ---------------------------------------------------------------------


def test_stop_gradient_switch_runs_the_online_modules_without_own_weights():
    torch.manual_seed(0)
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.target = EMA(model.encoder)
    assert use_stop_gradient_targets(model) == 1
    assert not any(key.startswith("target.") for key in model.state_dict())
    x = torch.randn(8, 3)
    torch.testing.assert_close(model.target(x), model.encoder(x), rtol=0, atol=0)
    assert not model.target(x).requires_grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.target.update(0.5)  # a no-op: there is nothing to average
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- key queue --------------------------------------------------------------------------------


def _numbered(start: int, n: int, dim: int = 2) -> torch.Tensor:
    """Keys whose every entry is their own number, so a slot shows which key it holds."""
    return torch.arange(start, start + n, dtype=torch.float).unsqueeze(1).expand(n, dim).clone()


def test_queue_starts_with_random_unit_keys_and_pointer_zero():
    queue = Queue(7, 5)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(7))
    assert queue.ptr.item() == 0
    assert set(queue.state_dict()) == {"keys", "ptr"}


def test_queue_dequeues_oldest_keys_first_with_a_non_multiple_size():
    queue = Queue(5, 2)  # 5 is not a multiple of the batch of 2
    for push in range(4):  # keys 0..7; the third and fourth pushes wrap around
        queue.push(_numbered(2 * push, 2))
    # Written slot by slot: 0 1 2 3 4 | 5 6 7 -> slots hold [5, 6, 7, 3, 4], next write at 3.
    assert queue.keys[:, 0].tolist() == [5, 6, 7, 3, 4]
    assert queue.ptr.item() == 3
    oldest_first = queue.keys.roll(-queue.ptr.item(), dims=0)[:, 0]
    assert oldest_first.tolist() == [3, 4, 5, 6, 7]  # the newest 5 keys, in push order


def test_queue_push_longer_than_the_queue_keeps_the_newest_keys():
    queue = Queue(4, 2)
    queue.push(_numbered(0, 3))  # ptr 3
    queue.push(_numbered(3, 6))  # keys 3..8: only 5..8 survive, written from slot 3 on
    oldest_first = queue.keys.roll(-queue.ptr.item(), dims=0)[:, 0]
    assert oldest_first.tolist() == [5, 6, 7, 8]
    assert queue.ptr.item() == (3 + 6) % 4


def test_queue_state_round_trips_through_a_state_dict():
    queue = Queue(5, 3)
    queue.push(F.normalize(torch.randn(3, 3), dim=1))
    restored = Queue(5, 3)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys) and restored.ptr.item() == 3


# --- shuffled BN ------------------------------------------------------------------------------


def test_shuffled_returns_each_sample_output_in_its_original_position():
    torch.manual_seed(0)
    module = nn.Linear(4, 3)  # no BN: samples do not interact, so any split gives the same rows
    x = torch.randn(12, 4)
    out = shuffled(module, x, groups=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, module(x))


def test_shuffled_bn_equals_the_unshuffled_output_in_eval_mode():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval()
    module[1].running_mean.uniform_(-1, 1)
    module[1].running_var.uniform_(0.5, 2)
    x = torch.randn(12, 4)
    torch.testing.assert_close(shuffled(module, x, groups=3), module(x))


def test_shuffled_bn_with_one_group_equals_the_unshuffled_output():
    module = nn.BatchNorm1d(5)
    x = torch.randn(10, 5)
    torch.testing.assert_close(shuffled(module, x, groups=1), nn.BatchNorm1d(5)(x))


def test_shuffled_bn_in_train_mode_normalises_each_sample_with_its_group_statistics():
    torch.manual_seed(0)
    x = torch.randn(12, 5) * 2 + 1
    out = shuffled(nn.BatchNorm1d(5), x, groups=3, generator=torch.Generator().manual_seed(7))
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    expected = torch.empty_like(x)
    for rows in permutation.tensor_split(3):  # the same groups, by the same generator
        group = x[rows]
        mean, var = group.mean(dim=0), group.var(dim=0, unbiased=False)
        expected[rows] = (group - mean) / torch.sqrt(var + 1e-5)  # BN with batch statistics
    torch.testing.assert_close(out, expected)
    whole = (x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0, unbiased=False) + 1e-5)
    assert not torch.allclose(out, whole, atol=1e-3)  # the group statistics did change the keys


def test_shuffled_draws_its_permutation_from_the_global_rng_when_no_generator_is_given():
    x = torch.randn(12, 5)
    torch.manual_seed(3)
    first = shuffled(nn.BatchNorm1d(5), x, groups=4)
    torch.manual_seed(3)
    second = shuffled(nn.BatchNorm1d(5), x, groups=4)
    assert torch.equal(first, second)


def _shuffled_on_two_processes(rank: int, x_all: torch.Tensor) -> list:
    torch.manual_seed(100 + rank)  # different global RNGs: the broadcast permutation must win
    x = x_all.chunk(2)[rank]
    out = shuffled(nn.BatchNorm1d(5), x, groups=4, generator=torch.Generator().manual_seed(5))
    return out.tolist()  # plain lists: no shared memory outliving the worker


@pytest.mark.slow
def test_shuffled_bn_across_two_processes_normalises_global_groups_and_returns_own_rows():
    x_all = torch.randn(16, 5) * 2 + 1
    outputs = run_on_processes(_shuffled_on_two_processes, 2, x_all)
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(5))  # rank 0's
    expected = torch.empty_like(x_all)
    for rows in permutation.tensor_split(4):  # 4 BN groups over the global batch of 16
        group = x_all[rows]
        expected[rows] = (group - group.mean(0)) / torch.sqrt(group.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(torch.tensor(outputs[0] + outputs[1]), expected)
