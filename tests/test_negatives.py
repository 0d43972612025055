"""MemoryBank: InstDisc's update v ← normalise(m·v + (1 − m)·f), sampling, exact resume."""

import math

import pytest
import torch

from selfsup.negatives import MemoryBank


def test_initial_entries_are_uniform_with_unit_expected_norm():
    torch.manual_seed(0)
    bank = MemoryBank(4000, 48)
    bound = 1 / math.sqrt(48 / 3)
    assert bank.features.abs().max() <= bound
    assert abs(bank.features.norm(dim=1).pow(2).mean().item() - 1.0) < 0.02  # E|v|² = dim·s²/3


def test_update_after_several_steps_follows_the_formula_by_hand():
    torch.manual_seed(0)
    bank = MemoryBank(5, 3, momentum=0.5)
    v = bank.features.clone()
    steps = [
        (torch.tensor([1, 3]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])),
        (torch.tensor([3, 0]), torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])),
        (torch.tensor([3]), torch.tensor([[-1.0, 0.0, 0.0]])),
    ]
    for index, f in steps:
        bank.update(index, f)
        for i, row in zip(index.tolist(), f, strict=True):  # one row at a time, by hand
            mixed = [0.5 * a + 0.5 * b for a, b in zip(v[i].tolist(), row.tolist(), strict=True)]
            norm = math.sqrt(sum(x * x for x in mixed))
            v[i] = torch.tensor([x / norm for x in mixed])
    torch.testing.assert_close(bank.features, v)
    assert torch.allclose(bank.features[[0, 1, 3]].norm(dim=1), torch.ones(3))
    untouched = [2, 4]
    assert not torch.allclose(bank.features[untouched].norm(dim=1), torch.ones(2))


def test_momentum_zero_overwrites_with_the_normalised_feature():
    bank = MemoryBank(3, 2, momentum=0.0)
    bank.update(torch.tensor([2]), torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(bank[torch.tensor([2])], torch.tensor([[0.6, 0.8]]))


def test_sampling_is_uniform_over_the_bank_and_seeded():
    bank = MemoryBank(10, 2)
    draws = bank.sample((20000,), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=10).float() / 20000
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.01)
    again = bank.sample((20000,), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_bank_resumes_exactly_from_its_state_dict():
    torch.manual_seed(0)
    bank = MemoryBank(6, 4)
    bank.update(torch.tensor([0, 5]), torch.randn(2, 4))
    torch.manual_seed(1)
    other = MemoryBank(6, 4)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.features, bank.features)


@pytest.mark.parametrize(("size", "dim", "momentum"), [(0, 4, 0.5), (4, 0, 0.5), (4, 4, 1.0)])
def test_bad_sizes_and_momentum_are_refused(size, dim, momentum):
    with pytest.raises(ValueError, match="memory bank"):
        MemoryBank(size, dim, momentum)


@pytest.mark.parametrize("size", [6, 400])  # full product (n <= K·D) and row gather (n > K·D)
def test_similarity_is_the_dot_product_with_each_querys_rows_and_trains_only_the_query(size):
    torch.manual_seed(0)
    bank = MemoryBank(size, 4)
    query = torch.randn(3, 4, requires_grad=True)
    rows = torch.randint(size, (3, 5))
    similarity = bank.similarity(query, rows)
    q = query.detach()
    by_hand = [[float(q[i] @ bank.features[rows[i, j]]) for j in range(5)] for i in range(3)]
    torch.testing.assert_close(similarity, torch.tensor(by_hand))
    similarity.sum().backward()
    assert query.grad is not None and not bank.features.requires_grad
