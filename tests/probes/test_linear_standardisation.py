"""The linear probe standardises features with the training split's statistics only.

A test set is scored with the map fitted on the training rows (as scikit-learn's StandardScaler
fit on train, transform on test): using the test set's own mean/std, or letting test rows into
the statistics of the training map, changes which class a test row gets. Each end-to-end case
below is built so that such a leak moves the accuracy by about 50 points, deterministically.
"""

from __future__ import annotations

import pytest
import torch

from selfsup.probes.linear import linear_probe, standardize_features


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_standardize_features_maps_train_and_test_with_the_train_mean_and_std():
    # 4000 rows: Bessel's correction (n vs n - 1) is 1e-4 relative, inside the tolerance, so
    # the check holds for either convention while test statistics would miss by far.
    train = torch.randn(4000, 3, generator=gen(0)) * torch.tensor([2.0, 0.5, 10.0]) + 3.0
    test = torch.randn(500, 3, generator=gen(1)) * torch.tensor([7.0, 0.1, 1.0]) - 20.0
    train_std, test_std = standardize_features(train, test)
    mean, std = train.mean(0), train.std(0)
    torch.testing.assert_close(train_std, (train - mean) / std, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(test_std, (test - mean) / std, rtol=1e-3, atol=1e-4)
    # the test rows keep their offset from train (own statistics would centre them on 0)
    assert test_std.mean(0).abs().min() > 2.0


def test_standardize_features_keeps_unit_scale_for_a_feature_constant_in_train():
    train = torch.cat([torch.randn(100, 1, generator=gen(2)), torch.full((100, 1), 5.0)], 1)
    test = torch.cat([torch.randn(20, 1, generator=gen(3)), torch.linspace(0, 10, 20)[:, None]], 1)
    train_std, test_std = standardize_features(train, test)
    # constant in train: centred on its train value (5), scale 1, even though test varies there
    assert torch.equal(train_std[:, 1], torch.zeros(100))
    torch.testing.assert_close(test_std[:, 1], test[:, 1] - 5.0)
    assert torch.isfinite(test_std).all()


def one_feature(centres_and_counts, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1) features: for class c, count rows around centre with std `spread`; labels (N,)."""
    generator, rows, labels = gen(seed), [], []
    for label, (centre, count) in enumerate(centres_and_counts):
        rows.append(centre + spread * torch.randn(count, 1, generator=generator))
        labels.append(torch.full((count,), label))
    return torch.cat(rows), torch.cat(labels)


def test_linear_probe_scores_a_one_class_test_set_with_the_train_map_not_its_own_statistics():
    # Train: class 0 around -12, class 1 around -8, balanced; the boundary is near -10.
    train, train_labels = one_feature([(-12.0, 200), (-8.0, 200)], spread=0.5, seed=0)
    # Test: only class-1 rows (around -8). In train units they sit at +1 std: all class 1.
    # Standardised with their own mean/std they would be centred on 0, i.e. on the boundary,
    # and about half would be called class 0 (49 % with these seeds); left raw (-8 in a space
    # where class 1 is at +1) they would all be class 0.
    test, _ = one_feature([(-8.0, 500)], spread=0.5, seed=1)
    test_labels = torch.ones(500, dtype=torch.long)
    correct = linear_probe(train, train_labels, test, test_labels, epochs=50)
    assert correct["top1"] == pytest.approx(100.0)

    own_train, _ = standardize_features(train, train)
    own_test, _ = standardize_features(test, test)
    leaked = linear_probe(own_train, train_labels, own_test, test_labels, standardize=False)
    assert leaked["top1"] < 60.0  # what the wrong map would score: the test above tells them apart


def test_linear_probe_fits_its_penalty_on_train_units_whatever_the_test_scale():
    # Train: class 0 around -1 (600 rows), class 1 around +1 (300 rows); std about 1.
    train, train_labels = one_feature([(-1.0, 600), (1.0, 300)], spread=0.3, seed=2)
    # Test: 100 class-1 rows like train's, and 100 class-0 rows far out at -1000, which any
    # sensible probe labels 0. They make the test std about 500 and the test mean about -500.
    near, _ = one_feature([(1.0, 100)], spread=0.3, seed=3)
    test = torch.cat([near, torch.full((100, 1), -1000.0)])
    test_labels = torch.cat([torch.ones(100), torch.zeros(100)]).long()
    correct = linear_probe(train, train_labels, test, test_labels, epochs=50)
    assert correct["top1"] == pytest.approx(100.0)

    # Had the statistics included the test rows (pooled, or the test set's alone), the training
    # features would shrink ~500x, the L2 penalty would crush the weight, and the probe would
    # answer the train majority (class 0) everywhere: 50 %.
    pooled = torch.cat([train, test])
    mean, std = pooled.mean(0), pooled.std(0)
    leaked = linear_probe(
        (train - mean) / std, train_labels, (test - mean) / std, test_labels, standardize=False
    )
    assert leaked["top1"] == pytest.approx(50.0)
