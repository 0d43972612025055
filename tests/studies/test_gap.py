"""The semantic-gap study: data.classes and data.fraction on any dataset, pre-D / eval-D, the
table of `selfsup gap`, reused runs, and its errors."""

import importlib
import json

import pytest
import torch
import yaml

from selfsup.build import build_views, load_data
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.data.datasets import synthetic
from selfsup.data.selection import parse_classes
from selfsup.data.subsets import labelled_subset
from selfsup.engine.monitor import KnnMonitor
from selfsup.run import Run
from selfsup.studies.gap import semantic_gap, split_classes

gap_module = importlib.import_module("selfsup.studies.gap")
runs_module = importlib.import_module("selfsup.studies.runs")


def data_config(tiny_config, **selection):
    return resolve({**tiny_config, "data": {**tiny_config["data"], **selection}})


def test_classes_keep_only_those_classes_relabelled_in_list_order_with_their_names(tiny_config):
    config = data_config(tiny_config, classes=[7, 2, 5])
    for split in ("train", "test"):
        full = synthetic(split, per_class=32, size=16)
        kept = load_data(config, split)
        assert kept.classes == ["layout 7", "layout 2", "layout 5"]
        assert torch.bincount(kept.labels).tolist() == [32, 32, 32]  # labels 0..2 only
        for new, old in enumerate([7, 2, 5]):
            assert torch.equal(kept.images[kept.labels == new], full.images[full.labels == old])


def test_fraction_is_exact_balanced_seeded_and_only_on_the_training_split(tiny_config):
    config = data_config(tiny_config, classes=[0, 1, 2, 3], fraction=0.25)
    train = load_data(config, "train")
    assert torch.bincount(train.labels).tolist() == [8, 8, 8, 8]  # round(0.25 · 32) each
    whole = load_data(data_config(tiny_config, classes=[0, 1, 2, 3]), "train")
    chosen = labelled_subset(whole.labels, 0.25, seed=config.train.seed)
    assert torch.equal(train.images, whole.images[chosen])
    assert len(load_data(config, "test")) == 4 * 32  # the test split stays whole
    other_seed = load_data(config.replace(["train.seed=1"]), "train")
    assert not torch.equal(other_seed.images, train.images)


def test_the_knn_monitor_sees_only_the_kept_classes(tiny_config):
    config = data_config(tiny_config, classes=[4, 6])
    train = load_data(config, "train")
    monitor = KnnMonitor.create(config, train, build_views(config), torch.device("cpu"))
    assert monitor.bank.num_classes == 2
    assert set(monitor.bank.labels.tolist()) == set(monitor.queries.labels.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "selection, message",
    [
        ({"clases": [0]}, "every dataset also takes: classes, fraction"),
        ({"classes": []}, "'data.classes' is empty"),
        ({"classes": [1, 1]}, "names a class twice"),
        ({"classes": "0,1"}, "a list of class ids"),
        ({"fraction": 0}, "'data.fraction' must be in (0, 1]"),
        ({"fraction": 1.5}, "'data.fraction' must be in (0, 1]"),
    ],
)
def test_bad_data_selection_keys_fail_when_the_config_is_read(tiny_config, selection, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        data_config(tiny_config, **selection)


def test_a_class_id_outside_the_dataset_fails_when_loaded(tiny_config):
    with pytest.raises(ValueError, match=r"class ids \[12\].*0\.\.9"):
        load_data(data_config(tiny_config, classes=[0, 12]), "train")


def test_pre_d_and_eval_d_are_disjoint_and_cover_every_class():
    pre, eval_d = split_classes([3, 0, 7], 10)
    assert pre == [3, 0, 7] and eval_d == [1, 2, 4, 5, 6, 8, 9]
    assert not set(pre) & set(eval_d) and sorted(pre + eval_d) == list(range(10))


@pytest.mark.parametrize(
    "classes, message",
    [([0, 10], r"\[10\] are outside .* 0\.\.9"), ([], "is empty"), (list(range(10)), "all 10")],
)
def test_bad_pre_classes_are_errors(classes, message):
    with pytest.raises(ValueError, match=message):
        split_classes(classes, 10)


def test_pre_classes_that_are_not_integers_are_an_error():
    with pytest.raises(ValueError, match="comma-separated class ids"):
        parse_classes("0,one")


@pytest.fixture
def recipes(study_config, tmp_path):
    """Tiny SimCLR and supervised recipes (conftest's study_config; the supervised one with
    another backbone, batch size and view size: the study gives it the recipe's backbone and
    batch, and probes it on whole images at the recipe's image size)."""
    tiny_config = study_config
    simclr = tmp_path / "simclr.yaml"
    simclr.write_text(yaml.safe_dump(tiny_config))
    tiny_config["method"] = {"name": "supervised"}
    tiny_config["views"] = {"name": "crop_flip", "size": 12}
    tiny_config["backbone"] = {"name": "resnet18", "stem": "small", "width": 0.25}
    tiny_config["optim"]["batch_size"] = 4
    supervised = tmp_path / "supervised.yaml"
    supervised.write_text(yaml.safe_dump(tiny_config))
    return str(simclr), str(supervised)


def test_the_study_trains_each_size_probes_eval_d_and_reuses_finished_runs(
    recipes, tmp_path, monkeypatch
):
    simclr, supervised = recipes
    out = tmp_path / "gap"
    study = dict(epochs=1, supervised=supervised, overrides=["train.max_steps=1"], out=out)
    table = semantic_gap(simclr, [1, 3], [1.0, 0.5], **study)
    assert [row["size"] for row in table["rows"]] == [0.5, 1.0]
    assert [row["images"] for row in table["rows"]] == [16, 32]  # of 16 per class, 2 classes
    assert table["eval_classes"] == [0, 2]
    eval_key = "synthetic[classes=0,2]/linear_top1"
    for row in table["rows"]:
        ssl, baseline = Run(row["ssl"]["run"]), Run(row["supervised"]["run"])
        assert ssl.config.method["name"] == "simclr"
        assert baseline.config.method["name"] == "supervised"
        assert baseline.config.backbone == ssl.config.backbone  # the same encoder
        assert baseline.config.optim.batch_size == ssl.config.optim.batch_size == 8  # same steps
        assert baseline.config.views["size"] == 12  # its own views, probed at the recipe's size
        assert baseline.info["image_size"] == ssl.info["image_size"] == 16
        for run, role in ((ssl, "ssl"), (baseline, "supervised")):
            assert run.config.data["classes"] == [1, 3]  # recorded in config.yaml
            assert run.info["classes"] == ["layout 1", "layout 3"]
            assert run.info["train_size"] == row["images"]
            stored = json.loads((run.path / "eval.json").read_text())
            assert row[role]["eval_linear_top1"] == stored[eval_key]
            assert all(0 <= row[role][f"{p}_top1"] <= 100 for p in ("eval_knn", "pre_linear"))
    lines = (out / "gap.md").read_text().splitlines()
    sizes = [line.split(" | ")[:2] for line in lines if line.startswith(("| 0.5 |", "| 1 |"))]
    assert sizes == [["| 0.5", "16"], ["| 1", "32"]]  # one row per size
    assert json.loads((out / "gap.json").read_text())["rows"] == table["rows"]
    assert table["gain"]["from"] == 0.5 and table["gain"]["to"] == 1.0

    modified = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/last.pt")}
    monkeypatch.setattr(runs_module, "train", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(gap_module, "evaluate", lambda *a, **k: pytest.fail("probed again"))
    again = semantic_gap(simclr, [1, 3], [0.5, 1.0], **study)
    assert again["rows"] == table["rows"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/last.pt")} == modified
    assert len(modified) == 4

    with pytest.raises(ValueError, match=r"other settings \(data\)"):
        semantic_gap(simclr, [1, 2], [0.5, 1.0], **study)


def test_the_command_reports_bad_pre_classes_and_a_missing_baseline_in_one_line(recipes, capsys):
    for classes, message in [
        ("0,4", "outside"),
        ("0,1,2,3", "none for eval-D"),
        ("0,,1", "comma-separated class ids"),
        ("0,1", "no supervised recipe for dataset 'synthetic'"),  # and no --supervised
    ]:
        assert main(["gap", recipes[0], "--pre-classes", classes, "--epochs", "1"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("selfsup: error:") and message in error
