"""Image folders larger than memory: decoded once into a memory-mapped uint8 cache.

`data.cache: DIR` (image_folder) decodes every image of the split once, in parallel worker
processes (Pillow), at `data.size` into one raw (N, C, size, size) uint8 file in DIR, and maps it:
training then reads the rows of each batch from the file (the operating system keeps what fits
in its page cache), never decodes a JPEG again and never holds the whole set in memory. The device
augmentation takes the batch from there, as from an in-memory split.

The cache is named by what it holds (the folder, its files with their sizes and modification
times, the size and the channels setting, and the decoding rule: `formats.DECODING` and Pillow's
version), so a changed folder or rule gets a new cache and an unchanged one is reused by every
run. Decoding a large folder takes long: progress goes to stderr, and an
interrupted decode resumes where it stopped (the decoded rows are marked in a file saved every
few seconds). Unreadable images are skipped and counted, as in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from selfsup.data import formats
from selfsup.files import make_folder

logger = logging.getLogger(__name__)

SAVE_SECONDS = 10.0  # how often an interrupted decode's progress is saved
REPORT_SECONDS = 10.0  # how often progress is logged
CHUNK = 64  # files per task of a worker
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def cached_image_folder(
    folder: str | Path,
    size: int | None,
    channels: int | None,
    cache: str | Path,
    workers: int | None = None,
    listing: tuple[list[Path], np.ndarray | None, list[str] | None] | None = None,
) -> tuple[
    np.ndarray, np.ndarray | None, list[str] | None, tuple[list[float], list[float]], list[Path]
]:
    """(images (N, C, size, size) uint8 memory-mapped, labels, classes, (mean, std), the file of
    each row) of an image folder, decoded into `cache` the first time. `listing`: (files, labels,
    classes) to decode instead of `formats.folder_listing(folder)` (e.g. a held-out part)."""
    folder = Path(folder)
    if size is None:
        raise ValueError(
            "data.cache stores every image at one size: set data.size (e.g. data.size=224: the "
            "shorter side resized to 224, the centre 224 x 224 kept)"
        )
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"data.workers must be a whole number >= 1, got {workers!r}")
    files, labels, classes = listing or formats.folder_listing(folder)
    formats.folder_mode((), channels)  # checks `channels`
    workers = workers or max(os.cpu_count() or 1, 1)
    key = _key(folder, files, size, channels)
    cache = Path(cache)
    make_folder(cache, "data.cache")
    meta_path = cache / f"{key}.json"
    if not meta_path.is_file():
        with _pool(workers) as pool:
            if channels is None:  # the headers decide: RGB unless every image is grayscale
                modes = pool.map(formats.image_mode, files, chunksize=256)
            mode = formats.folder_mode(modes if channels is None else (), channels)
            _decode(files, folder, size, mode, cache / key, pool)
    meta = json.loads(meta_path.read_text())
    shape = (meta["count"], meta["channels"], size, size)
    images = np.memmap(cache / f"{key}.u8", np.uint8, mode="c", shape=shape)  # writes stay private
    kept = np.asarray(meta["kept"], np.int64) if meta["kept"] is not None else None
    if labels is not None and kept is not None:
        labels = labels[kept]
    files = files if kept is None else [files[i] for i in kept]
    return images, labels, classes, (meta["mean"], meta["std"]), files


def _die_with_parent(parent: int) -> None:
    """In a worker, first: on Linux, ask the kernel for SIGTERM when the process that started
    it ends (prctl PR_SET_PDEATHSIG), so a decode killed with SIGKILL leaves no worker behind
    waiting for tasks; elsewhere the workers end with the pool as usual."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the request was made
        os._exit(1)


@contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """Worker processes (forked: they need only Pillow and numpy, and start at once; they end
    when this process ends, even by SIGKILL: `_die_with_parent`); on an error or Ctrl-C the
    tasks not started yet are dropped instead of waited for."""
    pool = ProcessPoolExecutor(
        workers,
        mp_context=get_context("fork"),
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _key(folder: Path, files: list[Path], size: int, channels: int | None) -> str:
    """The cache's name: the folder, the size and channels asked for, how images are decoded
    (formats.DECODING, and Pillow's version, whose resampling may change) and every file."""
    rules = f"{formats.DECODING}|Pillow {PIL.__version__}"
    digest = hashlib.sha256(f"{folder.resolve()}|{size}|{channels}|{rules}".encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"{folder.name}-{size}-{digest.hexdigest()[:16]}"


def _decode_one(path: Path, mode: str, size: int) -> np.ndarray | str:
    try:
        return formats.load_image(path, mode, size)
    except formats.UNREADABLE as error:
        return f"{type(error).__name__}: {error}"


def _decode_chunk(task: tuple[str, tuple[int, ...], list[tuple[int, str]], str, int]) -> list:
    """In a worker: decode some files straight into the partial cache file (no image crosses
    between processes); returns (row, None) for each decoded file, (row, why) for the others."""
    partial, shape, rows, mode, size = task
    images = np.memmap(partial, np.uint8, mode="r+", shape=shape)
    results = []
    for i, path in rows:
        result = _decode_one(Path(path), mode, size)
        if isinstance(result, str):
            results.append((i, result))
        elif result.shape != shape[1:]:  # cannot happen with load_image's resize; a guard
            results.append((i, f"decoded to {result.shape}, expected {shape[1:]}"))
        else:
            images[i] = result
            results.append((i, None))
    images.flush()  # on disk before the rows count as done
    return results


def _decode(
    files: list[Path], folder: Path, size: int, mode: str, stem: Path, pool: ProcessPoolExecutor
) -> None:
    """Decode every file into <stem>.u8 (resuming <stem>.partial), then write <stem>.json."""
    channels = 1 if mode == "L" else 3
    shape = (len(files), channels, size, size)
    partial, done_path = _file(stem, ".partial"), _file(stem, ".done.npy")
    resume = partial.is_file() and done_path.is_file()
    images = np.memmap(partial, np.uint8, mode="r+" if resume else "w+", shape=shape)
    images.flush()  # the file exists at its full size for the workers
    done = np.load(done_path) if resume else np.zeros(len(files), np.int8)  # 1 ok, -1 unreadable
    todo = np.flatnonzero(done == 0)
    if resume:
        logger.info(
            f"selfsup: resuming the cache of {folder}: {len(todo)} of {len(files)} images left"
        )
    tasks = (
        (str(partial), shape, [(int(i), str(files[i])) for i in todo[start : start + CHUNK]],
         mode, size)
        for start in range(0, len(todo), CHUNK)
    )  # fmt: skip
    started = last_save = last_report = time.perf_counter()
    skipped: list[str] = []
    count = 0
    for results in pool.map(_decode_chunk, tasks):
        for i, why in results:
            done[i] = 1 if why is None else -1
            if why is not None:
                skipped.append(f"{files[i].relative_to(folder)} ({why})")
        count += len(results)
        now = time.perf_counter()
        if now - last_save > SAVE_SECONDS:
            _save_array(done, done_path)
            last_save = now
        if now - last_report > REPORT_SECONDS:
            rate = count / (now - started)
            logger.info(
                f"selfsup: caching {folder}: {count}/{len(todo)} images, {rate:.0f} img/s, "
                f"~{(len(todo) - count) / rate / 60:.1f} min left"
            )
            last_report = now
    images.flush()
    _save_array(done, done_path)
    kept = np.flatnonzero(done == 1)
    if not len(kept):
        raise ValueError(f"none of the {len(files)} image files in {folder} can be read")
    unreadable = np.flatnonzero(done == -1)  # also those an interrupted decode found
    if len(unreadable):
        example = skipped[0] if skipped else files[unreadable[0]].relative_to(folder)
        logger.warning(
            f"selfsup: warning: skipped {len(unreadable)} of {len(files)} image files in {folder} "
            f"that cannot be read (corrupt, truncated or not images), e.g. {example}"
        )
        # Moving the rows in place cannot be resumed (a second pass would move them again): a
        # decode stopped from here on starts again.
        done_path.unlink()
        for row, i in enumerate(kept):  # close the gaps: row order stays the files' order
            if row != i:
                images[row] = images[i]
        images.flush()
    mean, std = _mean_std(images, len(kept))
    del images
    os.truncate(partial, len(kept) * int(np.prod(shape[1:])))
    os.replace(partial, _file(stem, ".u8"))
    meta: dict[str, Any] = {
        "folder": str(folder.resolve()),
        "count": int(len(kept)),
        "channels": channels,
        "kept": None if len(kept) == len(files) else kept.tolist(),
        "mean": mean,
        "std": std,
    }
    temporary = _file(stem, ".json.tmp")
    temporary.write_text(json.dumps(meta))
    os.replace(temporary, _file(stem, ".json"))  # the cache is complete once this exists
    done_path.unlink(missing_ok=True)


def _mean_std(images: np.memmap, count: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of the first `count` rows, read in chunks."""
    channels = images.shape[1]
    total, squares = np.zeros(channels), np.zeros(channels)
    for start in range(0, count, 1024):
        x = images[start : min(start + 1024, count)].astype(np.float64) / 255
        total += x.sum(axis=(0, 2, 3))
        squares += np.square(x).sum(axis=(0, 2, 3))
    pixels = count * images.shape[2] * images.shape[3]
    mean = total / pixels
    return mean.tolist(), np.sqrt(np.maximum(squares / pixels - mean**2, 0)).tolist()


def _file(stem: Path, suffix: str) -> Path:
    return stem.parent / f"{stem.name}{suffix}"  # not with_suffix: a folder name may have dots


def _save_array(array: np.ndarray, path: Path) -> None:
    temporary = _file(path, ".tmp.npy")
    np.save(temporary, array)
    os.replace(temporary, path)
