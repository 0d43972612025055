"""Bad input as a new user gives it: one clear line naming the problem and the fix, never a
traceback from inside yaml or torch (docs/hostile_input.md lists every case)."""

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

import selfsup
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.data.datasets import ImageData
from selfsup.data.formats import read_image_folder
from selfsup.registry import DATASETS


def _error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("method: {name: simclr\noptim: [", "line 2: not a valid recipe"),
        ("method: !!python/object/apply:os.system ['true']\n", "no Python tags"),
        ("- just\n- a list\n", "must be a YAML mapping"),
    ],
    ids=["syntax-error", "python-tag", "not-a-mapping"],
)
def test_a_broken_recipe_file_is_named_with_its_line(tmp_path, capsys, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert main(["train", str(recipe)]) == 2
    err = _error_line(capsys)
    assert str(recipe) in err and expected in err


def test_an_override_that_is_not_yaml_says_how_to_quote_it(capsys):
    assert main(["train", "simclr/fashion_mnist", "train.name=[unclosed"]) == 2
    assert "not valid YAML" in _error_line(capsys)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.temperature=0", "'method.temperature' must be > 0, got 0"),
        ("method.temperature=-0.5", "'method.temperature' must be > 0"),
        ("method.dim=0", "'method.dim' must be >= 1"),
        ("backbone.width=-1", "'backbone.width' must be > 0"),
        ("views.blur_p=1.5", "'views.blur_p' must be in [0, 1]"),
        ("optim.batch_size=0", "'optim.batch_size' must be > 0"),
        ("optim.batch_size=-4", "'optim.batch_size' must be > 0"),
        ("train.epochs=-3", "'train.epochs' must be > 0"),
        ("optim.lr=-0.1", "'optim.lr' must be >= 0"),
    ],
)
def test_a_value_out_of_range_fails_before_anything_runs(capsys, override, expected):
    assert main(["train", "simclr/fashion_mnist", override]) == 2
    assert expected in _error_line(capsys)


def test_momentum_above_one_is_refused_where_a_method_has_one(capsys):
    assert main(["train", "byol/fashion_mnist", "method.momentum=1.5"]) == 2
    assert "'method.momentum' must be in [0, 1]" in _error_line(capsys)


def _png(path, value, size=8):
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def test_unreadable_images_in_a_folder_are_skipped_and_counted(tmp_path, capsys, caplog):
    for cls, value in (("a", 10), ("b", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", value)
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    (tmp_path / "b" / "text.png").write_text("not an image")
    images, labels, classes = read_image_folder(tmp_path)
    assert images.shape == (6, 1, 8, 8) and classes == ["a", "b"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert (images[labels == 0] == 10).all() and (images[labels == 1] == 200).all()
    assert "skipped 3 of 9 image files" in caplog.text
    assert "Traceback" not in capsys.readouterr().err


def test_a_folder_of_only_unreadable_images_is_one_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 image files .* can be read"):
        read_image_folder(tmp_path)


def test_embed_of_a_missing_folder_says_no_such_folder(tiny_config, tmp_path, capsys):
    tiny_config["train"].update(epochs=1, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    capsys.readouterr()
    out = str(tmp_path / "f.npy")
    assert main(["embed", str(run.path), "/nonexistent/images", "-o", out]) == 2
    assert "no such folder" in _error_line(capsys)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ({"config.yaml": "method: {name: simclr\n"}, "config.yaml line 2: not a valid recipe"),
        ({"data.json": "{not json"}, "data.json: not valid JSON"),
        ({"data.json": None}, "data.json is missing"),
    ],
    ids=["config-yaml", "data-json", "no-data-json"],
)
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_damaged_run_folder_is_named_with_what_is_wrong(
    tiny_config, tmp_path, capsys, damage, expected, command
):
    tiny_config["train"].update(epochs=1, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    for name, text in damage.items():
        if text is None:
            (run.path / name).unlink()
        else:
            (run.path / name).write_text(text)
    capsys.readouterr()
    args = (
        ["eval", "knn", str(run.path)]
        if command == "eval"
        else ["train", "--resume", str(run.path)]
    )
    assert main(args) == 2
    assert expected in _error_line(capsys)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (np.r_[np.arange(39) % 4, -1], "image 39 has label -1"),
        (np.r_[np.arange(39) % 4, -3], "image 39 has label -3"),
        (np.linspace(0, 1, 40), "labels must be integer class ids"),
    ],
    ids=["minus-one", "negative", "fractional"],
)
def test_bad_labels_in_an_npz_file_are_refused(tmp_path, labels, expected):
    path = tmp_path / "data.npz"
    np.savez(path, images=np.zeros((40, 8, 8), np.uint8), labels=labels)
    with pytest.raises(ValueError, match=expected):
        DATASETS.build({"name": "npz", "root": str(path)}, split="train")


def test_labels_beyond_the_class_names_are_refused():
    with pytest.raises(ValueError, match="class ids 0..1; image 2 has label 2"):
        ImageData(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2]), ["a", "b"])


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["train", "simclr/fashion_mnist", "train.out_dir={blocked}"], "train.out_dir"),
        (["compare", "simclr/fashion_mnist", "--out", "{blocked}"], "--out"),
        (["momentum", "simclr/fashion_mnist", "--out", "{blocked}"], "--out"),
    ],
    ids=["train", "compare", "momentum"],
)
def test_an_output_folder_where_a_file_stands_fails_before_any_work(
    tmp_path, capsys, monkeypatch, command, option
):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    monkeypatch.setattr(importlib.import_module("selfsup.engine.train"), "load_data", _no_work)
    for blocked in (blocker, blocker / "runs"):
        argv = [part.format(blocked=blocked) for part in command]
        assert main(argv) == 2
        err = _error_line(capsys)
        assert f"{option}: cannot create the folder {blocked}" in err
        assert f"{blocker} is a file, not a folder; choose another {option}" in err


def _no_work(*args, **kwargs):
    raise AssertionError("the output folder is checked before any data is read")
