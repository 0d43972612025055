"""Image folders: decoding every run (in memory) against decoding once into the memory-mapped
cache (data.cache), on a generated folder of JPEGs, measured in one run.

    python benchmarks/streaming.py                       # 20,000 JPEGs of 96x72 px, size 64
    python benchmarks/streaming.py --images 5000 --size 32 --workers 2

Rows: the in-memory read (decoding on the main process, what every run without a cache pays),
building the cache (decoding in worker processes, once), opening a built cache (every later run),
then the batches of a training loop (uint8 rows in a seeded random order: `Batches.next`) from
memory and from the mapped file, and full training steps of a recipe from each.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfsup.build import load_data
from selfsup.config import load_config
from selfsup.data.datasets import image_folder
from selfsup.data.loader import Batches
from selfsup.engine.parts import Parts


def make_folder(root: Path, images: int, seed: int = 0) -> None:
    """`images` JPEGs of 96x72 px in 10 class folders: smooth random colour fields."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 72), Image.BILINEAR).save(folder / f"{i}.jpg")


def _seconds(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _batches_per_s(images: torch.Tensor, batch: int, steps: int) -> float:
    batches = Batches(images, batch, seed=0)
    batches.next()
    start = time.perf_counter()
    for _ in range(steps):
        batches.next()
    return steps * batch / (time.perf_counter() - start)


def _train_per_s(data_options: dict, size: int, steps: int, batch: int) -> float:
    """Images per second of SimCLR training steps on the folder, `size`-px views."""
    overrides = [f"data.{key}={value}" for key, value in data_options.items()]
    config = load_config(
        "simclr/fashion_mnist",
        [
            *overrides,
            f"views.size={size}",
            f"optim.batch_size={batch}",
            "backbone.width=0.25",
            "train.progress=false",
        ],
    )
    parts = Parts.build(config, load_data(config, "train"))
    parts.step(0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        parts.step(step)
    return steps * config.optim.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=200, help="batches per reading measurement")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="selfsup-streaming-"))
    try:
        folder, cache = work / "images", work / "cache"
        print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        made = _seconds(lambda: make_folder(folder, args.images))
        print(f"generated {args.images} JPEGs in {made:.1f} s")
        rows = []
        holder = {}
        t = _seconds(lambda: holder.update(memory=image_folder(root=str(folder), size=args.size)))
        rows.append(("read into memory (decode, 1 process)", args.images / t, t))
        build = _seconds(
            lambda: image_folder(
                root=str(folder), size=args.size, cache=str(cache), workers=args.workers
            )
        )
        rows.append((f"build the cache (decode, {args.workers or 'all'} workers)",
                     args.images / build, build))  # fmt: skip
        t = _seconds(
            lambda: holder.update(
                mapped=image_folder(root=str(folder), size=args.size, cache=str(cache))
            )
        )
        rows.append(("open the built cache", args.images / t, t))
        memory, mapped = holder["memory"], holder["mapped"]
        assert torch.equal(memory.images, mapped.images)
        nbytes = memory.images.numel()
        print(f"split: {nbytes / 2**20:.1f} MiB as uint8")
        print()
        print("| step | img/s | seconds |")
        print("|---|---|---|")
        for name, rate, seconds in rows:
            print(f"| {name} | {rate:,.0f} | {seconds:.2f} |")
        for name, images in (("memory", memory.images), ("mapped file", mapped.images)):
            rate = _batches_per_s(images, args.batch, args.steps)
            print(f"| batches of {args.batch} in random order from {name} | {rate:,.0f} | – |")
        options = {"name": "image_folder", "root": str(folder), "size": args.size}
        for name, extra in (("memory", {}), ("mapped file", {"cache": str(cache)})):
            rate = _train_per_s({**options, **extra}, 32, args.train_steps, args.batch)
            print(f"| SimCLR training steps (width 1/4, 32 px views) from {name} | "
                  f"{rate:,.0f} | – |")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
