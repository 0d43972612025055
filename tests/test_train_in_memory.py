"""Images in memory: selfsup.train("simclr", data=images, labels=labels) trains on a uint8
array or tensor without writing files, and the run stays evaluable (data/memory.py)."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_own_images import TINY  # tiny training overrides, shared

import selfsup
from selfsup.data import memory


def two_classes(count=40, height=20, width=24, seed=0):
    """(N, H, W, 3) uint8 images of two classes (bright left half / bright right half) and their
    labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 80, (count, height, width, 3), dtype=np.uint8)
    labels = np.arange(count) % 2
    for i, label in enumerate(labels):
        half = slice(0, width // 2) if label == 0 else slice(width // 2, width)
        images[i, :, half] += 150
    return images, labels


@pytest.fixture
def overrides(tmp_path):
    return [f"train.out_dir={tmp_path / 'runs'}", *TINY]


def test_a_method_trains_on_a_labelled_array_and_is_probed_on_held_out_images(overrides):
    images, labels = two_classes()
    run = selfsup.train("simclr", overrides, data=images, labels=labels)
    data = yaml.safe_load((run.path / "config.yaml").read_text())["data"]
    assert data["name"] == "array" and data["shape"] == [40, 3, 20, 24]
    assert data["labelled"] and data["size"] == 20 and data["test_fraction"] == 0.2
    assert run.config.method["name"] == "simclr" and run.info["num_classes"] == 2
    assert run.info["train_size"] == 32  # 20 % of each class held out for the probes
    assert any("knn_top1" in r and "event" not in r for r in run.metrics)  # the online monitor
    results = selfsup.evaluate(run)
    assert set(results) >= {"knn_top1", "linear_top1"}


def test_an_unlabelled_tensor_in_channels_first_trains_skips_the_probes_and_embeds(
    overrides, tmp_path, caplog
):
    images, _ = two_classes()
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    run = selfsup.train("byol", overrides=overrides, data=tensor)
    assert run.info["channels"] == 3 and run.info["num_classes"] is None
    with caplog.at_level("WARNING", logger="selfsup"):
        assert selfsup.evaluate(run) == {}
    assert "probes skipped" in caplog.text and "without labels" in caplog.text

    new = tmp_path / "new"
    new.mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(new / f"{i}.png")
    assert selfsup.embed(run, str(new)).shape[0] == 3  # data.json has what embed needs
    found = selfsup.neighbours(run, str(new / "0.png"), k=3)[0]["neighbours"]
    assert [n["file"] for n in found] == [None] * 3  # the gallery: the arrays, by index
    assert all(0 <= n["index"] < 40 for n in found)


def test_a_later_process_is_told_how_to_give_the_images_again(overrides):
    images, labels = two_classes(seed=1)
    run = selfsup.train("simclr", overrides, data=images, labels=labels)
    memory.ARRAYS.clear()  # what a new process has
    with pytest.raises(FileNotFoundError, match="another process.*remember\\(images, labels\\)"):
        selfsup.evaluate(run)
    memory.remember(images, labels)  # the same arrays: the same key
    assert "knn_top1" in selfsup.evaluate(run, ["knn"])


def test_gray_arrays_are_one_channel_and_large_ones_are_resized(overrides):
    images = np.random.default_rng(0).integers(0, 256, (16, 100, 120), dtype=np.uint8)
    # width 1/4: at 1/8, 64-px steps in channels_last crash torch 2.13's CPU backward (a torch bug)
    wider = [*overrides, "optim.batch_size=4", "backbone.width=0.25"]
    run = selfsup.train("simclr/folder", wider, data=images)
    assert run.info["channels"] == 1 and run.info["image_size"] == 64  # AUTO_MAX_SIZE
    assert run.config.data["size"] == 64


@pytest.mark.parametrize(
    ("data", "labels", "expected"),
    [
        (np.zeros((8, 16, 16, 3), np.float32), None, "got dtype float32; floats in \\[0, 1\\]"),
        (np.zeros((8, 16), np.uint8), None, "got 2 dimensions"),
        (np.zeros((16, 16, 3), np.uint8), None, "looks like one \\(H, W, C\\) image"),
        (torch.zeros(8, 3, 16, 3, dtype=torch.uint8), None, "is ambiguous"),
        (np.zeros((8, 16, 16, 2), np.uint8), None, "no 1, 3 or 4 channels"),
        ([[0, 1]], None, "got list"),
        (np.zeros((8, 16, 16), np.uint8), np.zeros(7, int), "shape \\(8,\\); got \\(7,\\)"),
        (np.zeros((8, 16, 16), np.uint8), np.full(8, 0.5), "whole class ids"),
        (np.zeros((8, 16, 16), np.uint8), np.full(8, -1), "from 0"),
    ],
    ids=[
        "float",
        "rank-2",
        "one-image",
        "ambiguous",
        "two-channels",
        "list",
        "label-count",
        "float-labels",
        "negative-labels",
    ],  # fmt: skip
)
def test_wrong_arrays_are_refused_in_one_line(overrides, data, labels, expected):
    with pytest.raises(ValueError, match=expected) as error:
        selfsup.train("simclr", overrides, data=data, labels=labels)
    assert "\n" not in str(error.value)


def test_rgba_arrays_are_laid_over_white_as_rgba_files_are():
    rgba = np.zeros((1, 5, 6, 4), np.uint8)  # transparent black but one pixel
    rgba[0, 0, 1] = (10, 20, 30, 255)
    rgb = memory.as_images(rgba)
    assert rgb[0, :, 0, 0].tolist() == [255, 255, 255] and rgb[0, :, 0, 1].tolist() == [10, 20, 30]


def test_a_method_without_a_folder_recipe_names_the_ones_with_one(overrides):
    images = np.zeros((8, 16, 16), np.uint8)
    with pytest.raises(FileNotFoundError, match="no recipe for your own images.*simclr"):
        selfsup.train("cpc", overrides, data=images)
    with pytest.raises(ValueError, match="did you mean 'simclr'"):
        selfsup.train("simclrr", overrides, data=images)
    with pytest.raises(ValueError, match="labels= labels the images given as data="):
        selfsup.train("simclr/folder", overrides, labels=[0, 1])


def test_a_folder_path_as_data_trains_on_that_folder(overrides, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    images, _ = two_classes(count=8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    run = selfsup.train("vicreg", overrides, data=str(folder))
    assert run.config.data["name"] == "image_folder" and run.info["train_size"] == 8
