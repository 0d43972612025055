"""Semi-supervised label fractions: exact, class-balanced, seeded subsets; saved in the run and
reused on resume; only the labelled images reach the method; the monitor keeps the whole split."""

import json

import pytest
import torch

import selfsup
from selfsup.config import resolve
from selfsup.data.subsets import LABELLED_FILE, labelled_subset
from selfsup.engine import train as train_module
from selfsup.methods.supervised import Supervised

# An imbalanced fixture: 5 classes of 200, 37, 12, 3 and 1 examples, shuffled.
COUNTS = [200, 37, 12, 3, 1]
LABELS = torch.repeat_interleave(torch.arange(5), torch.tensor(COUNTS))[
    torch.randperm(sum(COUNTS), generator=torch.Generator().manual_seed(0))
]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_each_class_contributes_round_fraction_of_its_examples_and_at_least_one(fraction):
    indices = labelled_subset(LABELS, fraction, seed=0)
    assert torch.equal(indices, indices.unique())  # sorted, no repeats
    chosen = torch.bincount(LABELS[indices], minlength=5).tolist()
    assert chosen == [max(round(fraction * n), 1) for n in COUNTS]


def test_the_whole_fraction_keeps_every_example():
    assert torch.equal(labelled_subset(LABELS, 1.0, seed=3), torch.arange(len(LABELS)))


def test_the_subset_depends_on_the_seed_only():
    first, again = labelled_subset(LABELS, 0.1, seed=0), labelled_subset(LABELS, 0.1, seed=0)
    assert torch.equal(first, again)
    assert not torch.equal(first, labelled_subset(LABELS, 0.1, seed=1))


def test_a_smaller_fraction_lies_inside_a_larger_one():
    small, large = labelled_subset(LABELS, 0.05, seed=0), labelled_subset(LABELS, 0.5, seed=0)
    assert set(small.tolist()) <= set(large.tolist())


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_fraction_outside_zero_one_is_an_error(fraction):
    with pytest.raises(ValueError, match=r"label_fraction' must be in \(0, 1\]"):
        labelled_subset(LABELS, fraction, seed=0)


def test_a_dataset_without_labels_is_an_error():
    with pytest.raises(ValueError, match="dataset has no labels"):
        labelled_subset(None, 0.1, seed=0)


def test_the_config_checks_the_range_and_that_the_method_trains_on_labels(tiny_config):
    with pytest.raises(ValueError, match=r"'train.label_fraction' must be in \(0, 1\], got 0.0"):
        resolve({**tiny_config, "method": {"name": "supervised"}, "train": {"label_fraction": 0}})
    with pytest.raises(ValueError, match="method 'simclr' trains on no labels.*finetune"):
        resolve({**tiny_config, "train": {"label_fraction": 0.1}})
    for method in ("supervised", "supcon"):
        resolve({**tiny_config, "method": {"name": method}, "train": {"label_fraction": 0.1}})


@pytest.fixture
def supervised_config(tiny_config):
    """Supervised on 320 synthetic images (32 per class), a quarter of them labelled: 80."""
    tiny_config["method"] = {"name": "supervised"}
    tiny_config["views"] = {"name": "crop_flip", "size": 16}
    tiny_config["optim"]["batch_size"] = 16  # 5 steps per epoch of the 80 labelled images
    tiny_config["train"].update(label_fraction=0.25, knn_every=0, collapse_guard=False)
    return tiny_config


@pytest.fixture
def seen(monkeypatch):
    """Every batch's (dataset indices, labels) that reach Supervised.forward."""
    batches = []
    original = Supervised.forward

    def record(self, views, progress):
        batches.append((views.index.clone(), views.labels.clone()))
        return original(self, views, progress)

    monkeypatch.setattr(Supervised, "forward", record)
    return batches


def _train_labels(config):
    return selfsup.DATASETS.build(config.data, split="train").labels


def test_a_run_trains_only_on_its_labelled_subset_and_saves_it(supervised_config, seen):
    supervised_config["train"]["max_steps"] = 5  # one epoch of the subset
    run = selfsup.train(resolve(supervised_config))
    labels = _train_labels(run.config)
    saved = json.loads((run.path / LABELLED_FILE).read_text())
    expected = labelled_subset(labels, 0.25, seed=0)
    assert (saved["fraction"], saved["seed"], saved["indices"]) == (0.25, 0, expected.tolist())
    index = torch.cat([i for i, _ in seen])
    assert sorted(index.tolist()) == list(range(80))  # each labelled image once per epoch
    assert torch.equal(torch.cat([y for _, y in seen]), labels[expected][index])
    assert run.info["train_size"] == 80
    assert [r["epoch"] for r in run.metrics if r.get("step") == 4][0] == pytest.approx(0.8)


def test_a_resumed_run_trains_on_the_saved_indices(supervised_config, seen):
    supervised_config["train"]["max_steps"] = 2
    run = selfsup.train(resolve(supervised_config))
    saved = json.loads((run.path / LABELLED_FILE).read_text())
    saved["indices"] = list(range(80))  # classes 0, 1 and half of 2: not what the seed picks
    (run.path / LABELLED_FILE).write_text(json.dumps(saved))
    seen.clear()
    selfsup.train(resume=run.path, overrides=["train.max_steps=5"])
    assert set(torch.cat([y for _, y in seen]).tolist()) <= {0, 1, 2}


def test_a_resume_that_changes_the_fraction_is_an_error(supervised_config):
    supervised_config["train"]["max_steps"] = 1
    run = selfsup.train(resolve(supervised_config))
    with pytest.raises(ValueError, match="label_fraction=0.25, train.seed=0.*not train.label_"):
        selfsup.train(resume=run.path, overrides=["train.label_fraction=0.5"])
    with pytest.raises(ValueError, match="label_fraction=0.25.*not train.label_fraction=None"):
        selfsup.train(resume=run.path, overrides=["train.label_fraction=null"])
    supervised_config["train"].update(label_fraction=None, name="all")
    everything = selfsup.train(resolve(supervised_config))
    assert not (everything.path / LABELLED_FILE).exists()
    with pytest.raises(ValueError, match="trains on all labels"):
        selfsup.train(resume=everything.path, overrides=["train.label_fraction=0.25"])


def test_the_knn_monitor_still_sees_the_whole_training_split(supervised_config, monkeypatch):
    sizes = []

    def create(config, data, views, device, explain=False):
        sizes.append(len(data))

    monkeypatch.setattr(train_module.KnnMonitor, "create", create)
    supervised_config["train"]["max_steps"] = 1
    selfsup.train(resolve(supervised_config))
    assert sizes == [320]
