"""Transfer: scikit-learn's digits as a second real dataset, and a run pre-trained on one dataset
probed (kNN, linear) or fine-tuned on another."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup.build import build_views, data_info, finetune_config, load_data
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.data.datasets import digits
from selfsup.eval.protocols import evaluate
from selfsup.probes.knn import knn
from selfsup.registry import DATASETS
from selfsup.run import Run


def small_config(out_dir: str) -> dict:
    """conftest's tiny_config (SimCLR on 16x16 one-channel synthetic data), for a module fixture."""
    return {
        "method": {"name": "simclr", "hidden": 64, "dim": 32, "temperature": 0.5},
        "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
        "data": {"name": "synthetic", "per_class": 32, "size": 16},
        "views": {"name": "simclr", "size": 16, "blur_p": 0.0, "scale": [0.4, 1.0],
                  "strength": 0.5},
        "optim": {"name": "sgd", "lr": 0.3, "batch_size": 32, "warmup_epochs": 1},
        "train": {"epochs": 1, "max_steps": 2, "knn_every": 0, "out_dir": out_dir,
                  "name": "tiny", "progress": False},
        "eval": {"knn_k": 20, "linear_epochs": 5},
    }  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A two-step SimCLR run on synthetic data (dataset A), evaluated on A with kNN."""
    from selfsup.engine.train import train

    run = train(resolve(small_config(str(tmp_path_factory.mktemp("runs")))))
    evaluate(run, ["knn"])
    return run


def test_digits_are_28x28_uint8_in_ten_classes_split_80_20_within_each_class():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    source = sklearn_datasets.load_digits()
    train, test = digits("train"), digits("test")
    assert train.images.shape == (1438, 1, 28, 28) and test.images.shape == (359, 1, 28, 28)
    assert train.images.dtype == test.images.dtype == torch.uint8
    assert train.classes == test.classes == [str(d) for d in range(10)]
    per_class = np.bincount(source.target, minlength=10)
    expected_test = np.round(0.2 * per_class)  # 35.6 -> 36, 34.8 -> 35, ...
    assert torch.bincount(test.labels, minlength=10).tolist() == expected_test.tolist()
    assert (
        torch.bincount(train.labels, minlength=10).tolist() == (per_class - expected_test).tolist()
    )
    # Bilinear enlarging by 3.5 copies each corner pixel of the 8x8 source into the 2x2 corner
    # block; so every image's corners are its source's, scaled from 0..16 to 0..255.
    scaled = np.round(source.images * 255 / 16).astype(np.uint8)
    corners = {
        tuple(s[[0, 0, 7, 7], [0, 7, 0, 7]]) + (int(y),)
        for s, y in zip(scaled, source.target, strict=True)
    }
    for split in (train, test):
        image = split.images[:, 0].numpy()
        for row, col in ((1, 1), (1, 26), (26, 1), (26, 26)):
            edge = {0: 0, 1: 0, 26: 27, 27: 27}
            assert np.array_equal(image[:, row, col], image[:, edge[row], edge[col]])
        found = image[:, [0, 0, 27, 27], [0, 27, 0, 27]]
        assert all(
            tuple(c) + (int(y),) in corners for c, y in zip(found, split.labels, strict=True)
        )


def test_digits_split_is_the_same_every_time_and_train_and_test_do_not_overlap():
    pytest.importorskip("sklearn")
    first, again = digits("test"), digits("test")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    train = digits("train")
    # scikit-learn's 1,797 images are all different, and so are their enlargements.
    distinct = {bytes(x.numpy()) for x in torch.cat([train.images, first.images])}
    assert len(distinct) == len(train) + len(first) == 1797


def test_digits_without_scikit_learn_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'selfsup\[digits\]'"):
        DATASETS.build({"name": "digits"}, split="train")


def test_transfer_keys_name_the_dataset_and_leave_the_runs_own_results(pretrained):
    pytest.importorskip("sklearn")
    own = json.loads((pretrained.path / "eval.json").read_text())
    assert {"knn_top1", "knn_top5"} <= set(own)  # the fixture's own evaluation
    results = evaluate(pretrained, ["knn"], data="digits")
    assert set(results) == {"digits/knn_top1", "digits/knn_top5"}
    stored = json.loads((pretrained.path / "eval.json").read_text())
    assert stored == {**own, **results}
    event = pretrained.metrics[-1]
    assert event["event"] == "eval" and event["data"] == "digits"
    assert {k for k in event if "/" in k} == set(results)

    # The same kNN computed directly: digits resized 28 -> 16 (the run's size; bilinear with
    # antialias as the eval transform) and normalised with the mean and std of dataset A.
    mean = torch.tensor(pretrained.info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pretrained.info["std"]).view(1, -1, 1, 1)
    encoder = pretrained.encoder.eval()

    def features(images):
        x = F.interpolate(images.float() / 255, size=16, mode="bilinear", antialias=True)
        with torch.no_grad():
            return encoder((x - mean) / std)

    train, test = digits("train"), digits("test")
    direct = knn(
        features(train.images), train.labels, features(test.images), test.labels, k=20,
        temperature=pretrained.config.eval.knn_temperature, num_classes=10,
    )  # fmt: skip
    assert results["digits/knn_top1"] == pytest.approx(direct["top1"], abs=100 / 359 + 1e-6)


def test_transfer_to_images_with_other_channels_names_both(tmp_path):
    config = resolve(small_config(str(tmp_path)))
    run = Run.create(config, data_info(load_data(config, "train"), build_views(config)))
    with pytest.raises(ValueError, match="1-channel images, dataset 'synthetic' has 3-channel"):
        evaluate(run, ["knn"], data={"name": "synthetic", "channels": 3, "size": 16})
    with pytest.raises(ValueError, match="'classify' scores the run's own classes"):
        evaluate(run, ["classify"], data="synthetic")


def test_cli_eval_with_data_prints_the_prefixed_results(pretrained, capsys):
    pytest.importorskip("sklearn")
    assert main(["eval", "linear", str(pretrained.path), "--data", "digits"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert set(printed) == {
        "digits/linear_top1",
        "digits/linear_top5",
        "digits/linear_weight_decay",
    }
    assert 10 < float(printed["digits/linear_top1"]) <= 100  # chance: 10 %
    assert main(["eval", "knn", str(pretrained.path), "--data", "digitz"]) == 2
    assert "did you mean 'digits'" in capsys.readouterr().err


def test_finetune_on_another_dataset_drops_the_runs_data_options(pretrained):
    config = finetune_config(pretrained.path, ["data.name=digits"], recipe="finetune/fashion_mnist")
    assert config.data == {"name": "digits"}  # not synthetic's per_class and size
    assert config.views["size"] == 16 and config.train.init == str(pretrained.path)
    same = finetune_config(pretrained.path, [], recipe="finetune/fashion_mnist")
    assert same.data == pretrained.config.data
