"""data.cache: an image folder decoded once into a memory-mapped file, then trained from it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import selfsup
from selfsup.config import resolve
from selfsup.data import cache as cache_module
from selfsup.data.datasets import image_folder


@pytest.fixture
def folder(tmp_path):
    """Two classes of JPEGs and PNGs of several sizes, and one file that is not an image."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(9):
            size = (20 + 3 * i, 16 + 2 * c)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            suffix = ".jpg" if i % 2 else ".png"
            Image.fromarray(pixels).save(root / name / f"{i}{suffix}")
    (root / "dog" / "broken.png").write_text("not an image")
    return root


def test_the_cache_holds_exactly_the_images_and_labels_read_in_memory(folder, tmp_path, caplog):
    memory = image_folder(root=str(folder), size=12)
    mapped = image_folder(root=str(folder), size=12, cache=str(tmp_path / "cache"), workers=2)
    assert mapped.mapped and not memory.mapped
    assert torch.equal(mapped.images, memory.images)  # the same decoding, the gap closed
    assert torch.equal(mapped.labels, memory.labels) and mapped.classes == memory.classes
    assert "skipped 1 of 19" in caplog.text
    assert memory.stats is None  # so its mean_std reads every image
    assert np.allclose(mapped.mean_std(), memory.mean_std(), atol=1e-6)


def test_an_unchanged_folder_reuses_its_cache_and_a_changed_one_gets_a_new_one(
    folder, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    image_folder(root=str(folder), size=12, cache=str(cache), workers=1)
    monkeypatch.setattr(cache_module, "_decode", lambda *a: pytest.fail("decoded again"))
    again = image_folder(root=str(folder), size=12, cache=str(cache), workers=1)
    assert len(again) == 18
    monkeypatch.undo()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "cat" / "new.png")
    changed = image_folder(root=str(folder), size=12, cache=str(cache), workers=1)
    assert len(changed) == 19
    assert len(list(cache.glob("*.u8"))) == 2


def test_an_interrupted_decode_resumes_where_it_stopped(folder, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    monkeypatch.setattr(cache_module, "SAVE_SECONDS", 0.0)  # progress saved after every task
    monkeypatch.setattr(cache_module, "CHUNK", 1)  # a task per image
    real = cache_module._decode_one
    calls = {"n": 0}

    def stop_after_five(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args)

    class Serial:  # the pool, in this process, so that the interruption reaches the decode loop
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, function, items, chunksize=1):
            return map(function, items)  # lazily, as the pool's results arrive

    monkeypatch.setattr(cache_module, "_pool", lambda workers: Serial())
    monkeypatch.setattr(cache_module, "_decode_one", stop_after_five)
    with pytest.raises(KeyboardInterrupt):
        image_folder(root=str(folder), size=12, cache=str(cache))
    assert not list(cache.glob("*.json"))  # not complete
    monkeypatch.setattr(cache_module, "_decode_one", real)
    with caplog.at_level(logging.INFO, logger="selfsup"):
        resumed = image_folder(root=str(folder), size=12, cache=str(cache))
    assert "14 of 19 images left" in caplog.text
    assert torch.equal(resumed.images, image_folder(root=str(folder), size=12).images)


def test_a_cache_needs_one_image_size(folder, tmp_path):
    with pytest.raises(ValueError, match="data.cache stores every image at one size"):
        image_folder(root=str(folder), cache=str(tmp_path / "cache"))


def test_training_reads_its_batches_from_the_mapped_file(folder, tmp_path, tiny_config):
    splits = tmp_path / "splits"
    splits.mkdir()
    for split in ("train", "test"):  # both splits: the same images, each cached once
        (splits / split).symlink_to(folder)
    tiny_config["data"] = {
        "name": "image_folder", "root": str(splits), "size": 12, "cache": str(tmp_path / "c"),
    }  # fmt: skip
    tiny_config["views"]["size"] = 12
    tiny_config["optim"]["batch_size"] = 8
    tiny_config["train"].update(epochs=1, knn_every=0)
    tiny_config["eval"].update(monitor_train=16, monitor_test=8, knn_k=4)
    run = selfsup.train(resolve(tiny_config))
    assert run.info["train_size"] == 18
    assert any(r.get("event") == "end" for r in run.metrics)
