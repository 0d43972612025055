"""data.cache: an image folder decoded once into a memory-mapped file, then trained from it."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time

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


@pytest.mark.parametrize("changed", ["rule", "pillow"])
def test_a_cache_decoded_by_another_rule_or_pillow_is_not_reused(
    folder, tmp_path, monkeypatch, changed
):
    cache = tmp_path / "cache"
    image_folder(root=str(folder), size=12, cache=str(cache), workers=1)
    if changed == "rule":
        monkeypatch.setattr(cache_module.formats, "DECODING", "another rule")
    else:
        monkeypatch.setattr(cache_module.PIL, "__version__", "0.0.1")
    image_folder(root=str(folder), size=12, cache=str(cache), workers=1)
    assert len(list(cache.glob("*.u8"))) == 2  # decoded anew, beside the first


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


# A cache build in its own process, stopped for good at `stage` (then killed with SIGKILL):
# "decoding": its first `count` files decoded and recorded as done, the workers stuck on the
# files after them; "closing the gaps": every file decoded and the rows moved into the gaps of the
# unreadable ones, the cache not yet complete. It writes `stage` to stdout when it stops.
BUILD_UNTIL = """
import sys, threading
from pathlib import Path
import numpy as np
from selfsup.data import cache, formats

folder, out, stage, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cache.SAVE_SECONDS, cache.CHUNK = 0.0, 8  # the done rows recorded after every task of 8 files


def stop(message):
    print(message, flush=True)
    threading.Event().wait()  # until killed


if stage == "decoding":
    later = {str(f) for f in formats.folder_listing(Path(folder))[0][count:]}
    load, save = formats.load_image, cache._save_array

    def load_image(path, mode, size):  # in a worker (forked: it has this function)
        if str(path) in later:
            threading.Event().wait()
        return load(path, mode, size)

    def save_array(array, path):
        save(array, path)
        if np.count_nonzero(array) == count:
            stop(stage)

    formats.load_image, cache._save_array = load_image, save_array
else:
    cache._mean_std = lambda images, count: stop(stage)
cache.cached_image_folder(folder, 12, None, out, workers=2)
"""


def _live_members(group: int) -> list[int]:
    """The processes of process group `group` that have not ended (zombies count as ended)."""
    live = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()  # after "pid (comm)"
            if entry.isdigit() and int(fields[2]) == group and fields[0] != "Z":
                live.append(int(entry))
    return live


@pytest.mark.parametrize("stage", ["decoding", "closing the gaps"])
def test_a_decode_killed_with_sigkill_leaves_no_cache_that_a_later_run_trusts(
    stage, tmp_path, caplog
):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(40):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % 2}" / f"{i:02d}.png")
    (root / "class0" / "03.png").write_text("not an image")  # file 2: the rows after it move up
    cache = tmp_path / "cache"
    build = subprocess.Popen(
        [sys.executable, "-c", BUILD_UNTIL, str(root), str(cache), stage, "24"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its decoding workers in its process group
    )
    try:
        ready, _, _ = select.select([build.stdout], [], [], 120)
        assert ready and build.stdout.readline().decode().strip() == stage, (
            build.stderr.read().decode() if build.poll() is not None else "no word from it"
        )
        os.kill(build.pid, signal.SIGKILL)
        build.wait()
        if sys.platform.startswith("linux"):  # its workers end with it (PR_SET_PDEATHSIG)
            deadline = time.monotonic() + 20
            while _live_members(build.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _live_members(build.pid), "decoding workers outlived the killed process"
    finally:
        with contextlib.suppress(ProcessLookupError):  # its workers, which would wait forever
            os.killpg(build.pid, signal.SIGKILL)
    assert not list(cache.glob("*.json")), "the cache is not complete"
    assert len(list(cache.glob("*.partial"))) == 1

    with caplog.at_level(logging.INFO, logger="selfsup"):
        again = image_folder(root=str(root), size=12, cache=str(cache), workers=1)
    if stage == "decoding":
        assert "17 of 41 images left" in caplog.text  # it went on where the killed one stopped
    else:
        assert "resuming" not in caplog.text  # it started again
    clean = image_folder(root=str(root), size=12, cache=str(tmp_path / "clean"), workers=1)
    assert len(again) == len(clean) == 40
    assert torch.equal(again.images, clean.images)
    assert torch.equal(again.labels, clean.labels)
    assert np.allclose(again.mean_std(), clean.mean_std())
