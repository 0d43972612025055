"""Evaluation protocols on features: weighted kNN, linear probe, feature extraction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import selfsup.probes.linear as linear_module
from selfsup.probes.features import extract, pixel_features
from selfsup.probes.knn import accuracy, knn, knn_predict
from selfsup.probes.linear import linear_probe


def gaussian_clusters(num_classes, per_class, dim, spread, seed):
    """Samples (num_classes * per_class, dim) around random class centres, with labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * spread
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    return features, labels


def brute_force_knn_scores(train, train_labels, test, k, temperature, num_classes, center=False):
    """The InstDisc vote written one test sample at a time: the slow twin of knn_predict."""
    if center:
        mean = train.mean(0)
        train, test = train - mean, test - mean
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for row, query in enumerate(test.double()):
        similarities = [
            float(query @ sample.double() / (query.norm() * sample.double().norm()))
            for sample in train
        ]
        nearest = sorted(range(len(train)), key=lambda i: -similarities[i])[:k]
        for i in nearest:
            scores[row, train_labels[i]] += torch.tensor(similarities[i] / temperature).exp()
        scores[row] /= scores[row].sum()
    return scores


def test_knn_classifies_well_separated_clusters_perfectly():
    train, train_labels = gaussian_clusters(5, 40, 16, spread=8.0, seed=0)
    test, test_labels = gaussian_clusters(5, 20, 16, spread=8.0, seed=0)
    result = knn(train, train_labels, test.flip(0), test_labels.flip(0), k=20)
    assert result["top1"] == pytest.approx(100.0)


@pytest.mark.parametrize("center", [False, True])
def test_knn_matches_brute_force_reference_for_every_chunk_size(center):
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(60, 6, generator=generator) + 0.5
    test = torch.randn(25, 6, generator=generator) + 0.5
    train_labels = torch.randint(0, 4, (60,), generator=generator)
    reference = brute_force_knn_scores(train, train_labels, test, 7, 0.1, 4, center=center)
    chunked = [
        knn_predict(train, train_labels, test, k=7, temperature=0.1, chunk_size=size, center=center)
        for size in (1, 4, 25, None)
    ]
    for scores in chunked:
        torch.testing.assert_close(scores.double(), reference, rtol=1e-4, atol=1e-6)
        assert torch.equal(scores.argmax(1), reference.argmax(1))
        assert torch.equal(scores.argmax(1), chunked[0].argmax(1))


def test_knn_weights_let_one_close_neighbour_outvote_a_far_majority():
    # Query (1, 0): one class-0 sample at cosine 1.0, two class-1 samples at cosine 0.6.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    train_labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    weighted = knn_predict(train, train_labels, query, k=3, temperature=0.07)
    nearly_unweighted = knn_predict(train, train_labels, query, k=3, temperature=100.0)
    assert weighted.argmax(1).item() == 0  # exp(1/0.07) > 2 exp(0.6/0.07)
    assert nearly_unweighted.argmax(1).item() == 1  # plain majority of the 3 nearest


def test_knn_top5_is_at_least_top1_and_covers_all_of_fewer_classes():
    train, train_labels = gaussian_clusters(10, 30, 8, spread=0.7, seed=2)
    test, test_labels = gaussian_clusters(10, 10, 8, spread=0.7, seed=3)
    result = knn(train, train_labels, test, test_labels, k=50)
    assert 0.0 < result["top1"] < 100.0
    assert result["top5"] >= result["top1"]
    three = train_labels < 3, test_labels < 3
    few = knn(train[three[0]], train_labels[three[0]], test[three[1]], test_labels[three[1]], k=9)
    assert few["top5"] == pytest.approx(100.0)  # top-min(5, C) with C = 3


def test_knn_with_k_above_train_size_votes_with_all_samples():
    train, train_labels = gaussian_clusters(3, 5, 4, spread=6.0, seed=4)
    scores = knn_predict(train, train_labels, train[:4], k=1000)
    reference = brute_force_knn_scores(train, train_labels, train[:4], 15, 0.07, 3)
    torch.testing.assert_close(scores.double(), reference, rtol=1e-4, atol=1e-6)


def test_linear_probe_solves_linearly_separable_data():
    train, train_labels = gaussian_clusters(4, 100, 20, spread=3.0, seed=5)
    test, test_labels = gaussian_clusters(4, 50, 20, spread=3.0, seed=5)
    result = linear_probe(train, train_labels, test[50:], test_labels[50:], epochs=50)
    assert result["top1"] >= 99.0


def test_linear_probe_fits_random_labels_but_tests_at_chance():
    generator = torch.Generator().manual_seed(6)
    train = torch.randn(200, 128, generator=generator)
    test = torch.randn(3000, 128, generator=generator)
    train_labels = torch.randint(0, 10, (200,), generator=generator)
    test_labels = torch.randint(0, 10, (3000,), generator=generator)
    memorised = linear_probe(train, train_labels, train, train_labels, epochs=50)
    held_out = linear_probe(train, train_labels, test, test_labels, epochs=50)
    assert memorised["top1"] > 60.0
    assert 6.0 < held_out["top1"] < 14.0  # chance is 10 %, 3000 samples: std 0.55 %


def test_linear_probe_is_deterministic_and_chunking_keeps_the_full_batch_gradient():
    train, train_labels = gaussian_clusters(5, 60, 10, spread=0.8, seed=7)
    test, test_labels = gaussian_clusters(5, 40, 10, spread=0.8, seed=8)
    args = (train, train_labels, test, test_labels)
    rng_state = torch.get_rng_state()
    first = linear_probe(*args, epochs=30, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)  # a probe mid-training shifts no stream
    assert linear_probe(*args, epochs=30, seed=3) == first
    chunked = linear_probe(*args, epochs=30, seed=3, batch_size=64)
    assert chunked["top1"] == pytest.approx(first["top1"], abs=0.5)


def test_linear_probe_chooses_weight_decay_on_a_seeded_held_out_part_of_train():
    train, train_labels = gaussian_clusters(4, 50, 30, spread=0.5, seed=9)
    test, test_labels = gaussian_clusters(4, 50, 30, spread=0.5, seed=10)
    candidates = (1.0, 1e-2, 1e-6)
    result = linear_probe(
        train, train_labels, test, test_labels, epochs=30, weight_decay=candidates,
        val_fraction=0.25, seed=4,
    )  # fmt: skip
    # the documented split, written out: a permutation seeded with `seed`, its first 25 % held out
    order = torch.randperm(200, generator=torch.Generator().manual_seed(4))
    held_out, fit = order[:50], order[50:]
    scores = {
        wd: linear_probe(
            train[fit], train_labels[fit], train[held_out], train_labels[held_out],
            epochs=30, weight_decay=wd,
        )["top1"]
        for wd in candidates
    }  # fmt: skip
    best = max(candidates, key=lambda wd: (scores[wd], wd))  # ties: the stronger penalty
    assert result["weight_decay"] == best
    refit = linear_probe(train, train_labels, test, test_labels, epochs=30, weight_decay=best)
    assert result["top1"] == refit["top1"]  # then refitted on all training rows
    assert "weight_decay" not in refit  # one fixed value: nothing chosen


def test_held_out_choice_of_weight_decay_beats_a_too_weak_penalty_when_features_outnumber_rows():
    generator = torch.Generator().manual_seed(0)
    shift = torch.full((400,), 0.05)  # two classes apart along all 400 dims, 200 training rows

    def sample(n):
        labels = torch.randint(0, 2, (n,), generator=generator)
        return torch.randn(n, 400, generator=generator) + (2 * labels[:, None] - 1) * shift, labels

    (train, train_labels), (test, test_labels) = sample(200), sample(2000)
    args = (train, train_labels, test, test_labels)
    chosen = linear_probe(*args, epochs=50, weight_decay=(1.0, 1e-2, 1e-6), standardize=False)
    weak = linear_probe(*args, epochs=50, weight_decay=1e-6, standardize=False)
    assert chosen["weight_decay"] == 1.0
    assert chosen["top1"] > weak["top1"] + 1.5  # 72.2 vs 69.5 % on 2000 test rows


def test_linear_probe_rejects_an_empty_candidate_list_and_a_bad_fraction():
    train, labels = gaussian_clusters(2, 10, 3, spread=2.0, seed=1)
    with pytest.raises(ValueError, match="at least one candidate"):
        linear_probe(train, labels, train, labels, weight_decay=())
    with pytest.raises(ValueError, match="validation fraction"):
        linear_probe(train, labels, train, labels, weight_decay=(1e-3, 1e-4), val_fraction=1.5)


def tiny_encoder():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1)
    )


def test_extract_matches_eval_forward_and_restores_each_module_mode():
    encoder = tiny_encoder()
    encoder.train()
    encoder[1].eval()  # a frozen BatchNorm inside a training model must stay frozen
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    encoder[1].running_mean.uniform_(0, 1)
    features = extract(encoder, images, lambda x: x.float() / 255, batch_size=3)
    assert encoder.training and encoder[3].training and not encoder[1].training
    encoder.eval()
    with torch.no_grad():
        direct = encoder(images.float() / 255).flatten(1)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert features.shape == (10, 4)
    torch.testing.assert_close(features, direct)


def test_extracted_features_can_train_a_linear_probe():
    # No inference-mode tensors escape extract: the probe needs autograd on its own weights.
    images, labels = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.arange(40) % 2
    features = extract(tiny_encoder(), images, lambda x: x.float() / 255)
    assert not features.requires_grad
    result = linear_probe(features, labels, features, labels, epochs=5)
    assert 0.0 <= result["top1"] <= 100.0


def test_pixel_features_flatten_to_unit_range():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).repeat(2, 3, 4, 1)  # (2, 3, 4, 3)
    pixels = pixel_features(images)
    assert pixels.shape == (2, 36) and pixels.dtype == torch.float32
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert pixel_features(images[:, 0]).shape == (2, 12)


def test_the_l2_penalty_spares_the_bias_which_still_fits_the_class_shares(monkeypatch):
    """The probe minimises mean_i CE(W x_i + b, y_i) + λ/2 ||W||². Its optimum in b solves
    ∂/∂b = mean_i (softmax(W x_i + b) − onehot(y_i)) = 0: the predicted probabilities, averaged
    over the training rows, equal the classes' shares, however large λ. A penalty on b too would
    add λ·b and pull the average toward uniform."""
    generator = torch.Generator().manual_seed(0)
    shares = torch.tensor([0.6, 0.3, 0.1])
    labels = torch.arange(3).repeat_interleave((shares * 200).long())
    # the classes differ by a constant offset; λ = 10 all but flattens W
    features = 0.5 * labels[:, None] + torch.randn(len(labels), 4, generator=generator)
    logits = []

    def recording(scores, targets):
        logits.append(scores)
        return accuracy(scores, targets)

    monkeypatch.setattr(linear_module, "accuracy", recording)
    linear_probe(features, labels, features, labels, weight_decay=10.0)  # test rows = train rows
    probabilities = logits[0].softmax(dim=1)
    assert probabilities.std(dim=0).max() < 0.05  # W ≈ 0: every row gets nearly the same
    torch.testing.assert_close(probabilities.mean(dim=0), shares, rtol=0, atol=1e-4)


def offset_pixel_data(seed):
    """uint8 (N, 1, 2, 2) images whose shared offset dominates the cosine, with labels: the kNN
    on them differs with and without mean-centring."""
    from selfsup.data.datasets import ImageData

    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (90,), generator=generator)
    signal = torch.randn(90, 4, generator=generator) * 12 + labels[:, None] * 4.0
    images = (150 + signal).clamp(0, 255).round().to(torch.uint8).view(90, 1, 2, 2)
    return ImageData(images[:60], labels[:60]), ImageData(images[60:], labels[60:])


@pytest.mark.parametrize("center", [False, True])
def test_eval_knn_center_reaches_the_offline_probe_and_the_monitor(center):
    from selfsup.config import load_config
    from selfsup.engine.monitor import KnnMonitor
    from selfsup.eval.protocols import probe

    train, test = offset_pixel_data(0)
    flat = (pixel_features(train.images), pixel_features(test.images))
    expected = {
        c: knn(flat[0], train.labels, flat[1], test.labels, k=5, center=c) for c in (False, True)
    }
    assert expected[False]["top1"] != expected[True]["top1"]  # the fixture tells the two apart
    config = load_config(
        "simclr/fashion_mnist", ["eval.knn_k=5", f"eval.knn_center={str(center).lower()}"]
    )
    offline = probe(config, ["knn"], flat[0], train, flat[1], test)
    monitor = KnnMonitor(train, test, lambda x: x.float(), config, "cpu")(nn.Flatten())
    assert offline["knn_top1"] == pytest.approx(expected[center]["top1"])
    assert monitor["knn_top1"] == pytest.approx(expected[center]["top1"])
    # the pixel baseline's centring is given explicitly and wins over the setting
    forced = probe(config, ["knn"], flat[0], train, flat[1], test, center=True)
    assert forced["knn_top1"] == pytest.approx(expected[True]["top1"])
