"""Feature statistics: MMD, alignment, uniformity and within-class variation against their
formulas written out directly, and the `stats` protocol on a run (Python and command line)."""

import json
import math

import pytest
import torch

import selfsup
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.eval.analysis import _augmented_pairs, feature_statistics
from selfsup.probes.statistics import (
    alignment,
    intra_class_variation,
    mean_cosine_distance,
    mmd,
    uniformity,
)
from selfsup.registry import VIEWS


def gaussian(n, dim, seed, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) + shift


def test_mmd_of_a_set_with_itself_is_exactly_zero():
    x = gaussian(300, 8, seed=0)
    assert mmd(x, x) == 0.0
    assert mmd(x, x, max_samples=50) == 0.0  # both sets cut to the same rows
    assert mmd(x, x, bandwidth=0.3) == 0.0


@pytest.mark.parametrize("bandwidth", [None, 2.0])
def test_mmd_grows_with_the_shift_of_the_mean(bandwidth):
    x = gaussian(200, 4, seed=1)
    values = [mmd(x, gaussian(200, 4, seed=2, shift=s), bandwidth) for s in (0.0, 0.5, 1.0, 2.0)]
    assert 0 < values[0] < values[1] < values[2] < values[3]
    assert values[0] < 0.1 * values[1]  # two draws of one distribution: close to 0


def v_statistic(xs, ys, sigma):
    """MMD_b^2 of Gretton et al. 2012, eq. 5, one kernel value at a time."""

    def k(u, v):
        return math.exp(-(math.dist(u, v) ** 2) / (2 * sigma**2))

    m, n = len(xs), len(ys)
    xx = sum(k(a, b) for a in xs for b in xs) / m**2
    yy = sum(k(a, b) for a in ys for b in ys) / n**2
    xy = sum(k(a, b) for a in xs for b in ys) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_equals_the_v_statistic_written_as_a_double_loop():
    x, y = gaussian(4, 3, seed=3), gaussian(3, 3, seed=4, shift=0.7)
    xs, ys = x.tolist(), y.tolist()
    assert mmd(x, y, bandwidth=0.8) == pytest.approx(v_statistic(xs, ys, 0.8), rel=1e-12)
    pooled = xs + ys
    distances = sorted(
        math.dist(pooled[i], pooled[j]) for i in range(7) for j in range(i + 1, 7)
    )  # 21 distinct pairs: the median is the 11th
    median = distances[10]
    assert mmd(x, y) == pytest.approx(v_statistic(xs, ys, median), rel=1e-12)
    assert mmd(x.float(), y.float()) == pytest.approx(v_statistic(xs, ys, median), rel=1e-6)


def test_alignment_is_zero_for_identical_pairs_and_matches_the_formula_by_hand():
    z = gaussian(10, 5, seed=5)
    assert alignment(z, 3 * z) == pytest.approx(0.0, abs=1e-12)  # same directions
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[0.0, 3.0], [0.0, 1.0]])
    # unit pairs: (1,0)-(0,1) at squared distance 2, (0,1)-(0,1) at 0
    assert alignment(z1, z2) == pytest.approx((2 + 0) / 2)
    assert alignment(z1, z2, alpha=1) == pytest.approx((math.sqrt(2) + 0) / 2)
    with pytest.raises(ValueError, match="pairs"):
        alignment(z1, z2[:1])


def test_uniformity_of_two_antipodal_points_is_minus_4t():
    z = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])  # unit vectors (1,0), (-1,0): ||.||^2 = 4
    assert uniformity(z) == pytest.approx(-8.0)
    assert uniformity(z, t=1) == pytest.approx(-4.0)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_uniformity_is_the_log_mean_potential_over_distinct_pairs(chunk_size):
    z = gaussian(7, 3, seed=6)
    unit = [[v / math.sqrt(sum(c * c for c in row)) for v in row] for row in z.tolist()]
    potentials = [
        math.exp(-2 * math.dist(unit[i], unit[j]) ** 2)
        for i in range(7)
        for j in range(7)
        if i != j
    ]
    expected = math.log(sum(potentials) / len(potentials))
    assert uniformity(z, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-12)


def test_uniformity_is_lower_for_points_spread_on_the_circle_than_for_a_cluster():
    angles = torch.arange(12) * 2 * math.pi / 12
    spread = torch.stack([angles.cos(), angles.sin()], 1)
    clustered = torch.stack([(0.1 * angles).cos(), (0.1 * angles).sin()], 1)  # within 0.6 rad
    assert uniformity(spread) < uniformity(clustered) < 0


def test_intra_class_variation_is_zero_when_each_class_is_one_point():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 2]).repeat_interleave(4)
    lengths = torch.rand(12, 1, generator=torch.Generator().manual_seed(0)) + 0.5
    features = points[labels] * lengths  # lengths vary, directions do not
    assert intra_class_variation(features, labels) == pytest.approx(0.0, abs=1e-12)
    assert intra_class_variation(features, labels, relative=True) == pytest.approx(0.0, abs=1e-12)


def test_intra_class_variation_by_hand():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-2.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 0: mean (.5,.5), squared distances .5 and .5; class 1: one direction, 0
    assert intra_class_variation(features, labels) == pytest.approx((0.5 + 0.0) / 2)
    # class means (.5,.5) and (-1,0) around (-.25,.25): squared distances .625 each
    assert intra_class_variation(features, labels, relative=True) == pytest.approx(0.25 / 0.625)


def test_mean_cosine_distance_compares_the_directions_of_the_means():
    a = torch.tensor([[2.0, 1.0], [2.0, -1.0]])  # mean (2, 0)
    b = torch.tensor([[1.0, 5.0], [-1.0, 5.0]])  # mean (0, 5)
    assert mean_cosine_distance(a, b) == pytest.approx(1.0)
    assert mean_cosine_distance(a, 7 * a) == pytest.approx(0.0, abs=1e-12)
    assert mean_cosine_distance(a, -a) == pytest.approx(2.0)


def test_alignment_pairs_are_two_training_views_or_two_draws_of_a_single_view():
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (6, 1, 16, 16), generator=generator, dtype=torch.uint8)

    def pair(name):
        views = VIEWS.build({"name": name, "size": 16})
        return _augmented_pairs(torch.nn.Flatten(), images, views, 4, torch.device("cpu"), seed=0)

    first, second = pair("none")  # two identical centre crops: perfectly aligned
    assert first.shape == (6, 256) and torch.equal(first, second)
    for name in ("crop_flip", "simclr"):  # one view drawn twice; two views
        first, second = pair(name)
        assert first.shape == second.shape == (6, 256) and not torch.equal(first, second)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A SimCLR run of 2 steps on 80 synthetic 16-pixel images (10 classes), shared here."""
    config = {
        "method": {"name": "simclr", "hidden": 64, "dim": 32, "temperature": 0.5},
        "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
        "data": {"name": "synthetic", "per_class": 8, "size": 16},
        "views": {"name": "simclr", "size": 16, "blur_p": 0.0, "scale": [0.4, 1.0]},
        "optim": {"name": "sgd", "lr": 0.3, "batch_size": 16, "warmup_epochs": 1},
        "train": {
            "epochs": 1,
            "max_steps": 2,
            "knn_every": 0,
            "out_dir": str(tmp_path_factory.mktemp("runs")),
            "name": "tiny",
            "progress": False,
        },
    }
    return selfsup.train(resolve(config))


def test_feature_statistics_of_a_run_are_stored_and_seeded(tiny_run):
    results = feature_statistics(tiny_run, classes=[0, 1, 2, 3, 4], device="cpu")
    assert set(results) == {
        "effective_rank",
        "normalized_std",
        "uniformity",
        "alignment",
        "intra_class_variation",
        "intra_class_relative",
        "mean_cosine_distance",
        "mmd",
    }
    assert 1 <= results["effective_rank"] <= 80 and -4 <= results["uniformity"] <= 0
    assert 0 < results["alignment"] <= 4 and results["mmd"] > 0
    again = feature_statistics(tiny_run, classes=[0, 1, 2, 3, 4], device="cpu")
    assert again == results  # the same training views: seeded
    train = feature_statistics(tiny_run, split="train", device="cpu")
    assert "mmd" not in train
    stored = json.loads((tiny_run.path / "stats.json").read_text())
    assert stored["test"] == {**results, "classes": [0, 1, 2, 3, 4]}
    assert stored["train"] == train
    events = [r for r in tiny_run.metrics if r.get("event") == "stats"]
    assert [r["split"] for r in events] == ["test", "test", "train"]
    assert events[0]["mmd"] == results["mmd"] and events[0]["step"] == 2


def test_stats_command_prints_each_statistic_and_rejects_bad_classes(tiny_run, capsys):
    assert main(["stats", str(tiny_run.path), "--classes", "0,1", "--device", "cpu"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert float(printed["mmd"]) > 0 and "alignment" in printed
    assert main(["stats", str(tiny_run.path), "--classes", "0,10"]) == 2
    err = capsys.readouterr().err
    assert "[10]" in err and "0..9" in err
    assert main(["stats", str(tiny_run.path), "--classes", "0,x"]) == 2
    assert "comma-separated class ids" in capsys.readouterr().err
    every = ",".join(str(c) for c in range(10))
    assert main(["stats", str(tiny_run.path), "--classes", every]) == 2
    assert "strict subset" in capsys.readouterr().err
