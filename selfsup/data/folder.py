"""Your own images: what an image folder decides from its files, and its held-out test part.

`data.size: auto` and `data.channels: auto` (or null) are chosen from the image headers (no image
is decoded): the side is the median shorter side of the images, at most AUTO_MAX_SIZE (a size a
CPU trains at; larger images are resized down, smaller ones up), and the channels are 1 when
every image is grayscale (L, 16-bit, ...), else 3 (RGB; RGBA and palette images become RGB).
`settle` writes the chosen values into the data spec before a run is created, so the run's
config.yaml holds numbers and replays, evaluates and embeds the same way.

A labelled folder without train/ and test/ sub-folders holds out `data.test_fraction` of each
class as its test split (`held_out`, seeded by FOLDER_SPLIT_SEED, the same for every run), so the
probes score images the encoder was not trained on.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfsup.data import formats

logger = logging.getLogger(__name__)

AUTO = "auto"
AUTO_MAX_SIZE = 64  # px: ResNet-18 (small stem) steps on 64-px views take ~5x the 28-px ones
FOLDER_SPLIT_SEED = 0  # fixed: every run on a folder is evaluated on the same held-out images
SPLIT_NAMES = ("train", "test", "val")  # sub-folders that make a folder's own splits


def image_header(path: Path) -> tuple[str, int, int] | None:
    """(PIL mode, width, height) from an image file's header, None if it cannot be read."""
    with contextlib.suppress(*formats.UNREADABLE), Image.open(path) as image:
        return image.mode, image.width, image.height
    return None


def has_split_folders(root: Path) -> bool:
    """Whether `root` holds its own splits (root/train, root/test or root/val)."""
    return any((root / name).is_dir() for name in SPLIT_NAMES)


def check_root(root: Any) -> Path:
    """data.root as a folder that exists, or one line saying what to give."""
    if root is None or root == "":
        raise ValueError(
            "data.root is not set: give the folder of your images, e.g. "
            "`selfsup train simclr/folder data.root=~/photos`"
        )
    path = Path(str(root)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.root={root}: no such folder")
    if not path.is_dir():
        raise ValueError(f"data.root={root} is a file; give the folder that holds your images")
    return path


def check_size(size: Any) -> None:
    if size is None or size == AUTO:
        return
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"data.size must be a number of pixels (e.g. 64) or auto, got {size!r}")


def channel_setting(channels: Any) -> int | None:
    """data.channels as 1, 3 or None (automatic: 'auto' or null)."""
    if channels is None or channels == AUTO:
        return None
    if channels in (1, 3) and not isinstance(channels, bool):
        return int(channels)
    raise ValueError(f"data.channels must be 1, 3 or auto, got {channels!r}")


def decide(files: list[Path], size: Any, channels: Any) -> tuple[int | None, int, dict[str, Any]]:
    """(size, channels, what they were decided from) for `files`: `size` auto -> the median
    shorter side, at most AUTO_MAX_SIZE; `channels` None/auto -> 1 if every image is grayscale,
    else 3. Given values are kept. Reads every header once."""
    headers = [h for h in map(image_header, files) if h is not None]
    modes = Counter(mode for mode, _, _ in headers)
    shorter = np.array([min(w, h) for _, w, h in headers]) if headers else np.array([0])
    if size == AUTO:
        median = int(np.median(shorter))
        size = max(min(median, AUTO_MAX_SIZE), 1)
    chosen = channel_setting(channels)
    if chosen is None:
        chosen = 1 if formats.folder_mode(modes, None) == "L" else 3
    seen = {
        "images": len(files),
        "modes": dict(sorted(modes.items())),
        "shorter_sides": (int(shorter.min()), int(np.median(shorter)), int(shorter.max())),
    }
    return size, chosen, seen


def settle(spec: dict[str, Any]) -> dict[str, Any]:
    """The image_folder spec with `size` and `channels` decided from the files (where auto) and
    logged in one line: what a run writes into its config.yaml (with the root made absolute)."""
    root = check_root(spec.get("root"))
    check_size(spec.get("size"))
    labels = spec.get("labels", "auto")
    folder = root / "train" if (root / "train").is_dir() else root
    files, ids, classes = formats.folder_listing(folder, labels)
    size, channels, seen = decide(files, spec.get("size"), spec.get("channels"))
    low, median, high = seen["shorter_sides"]
    modes = ", ".join(f"{mode} {count}" for mode, count in seen["modes"].items())
    if classes is None:
        labelled = "no labels (the probes will be skipped)"
    else:
        named = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
        plural = "es" if len(classes) != 1 else ""
        labelled = f"{len(classes)} class{plural} from its sub-folders ({named})"
    resized = "each image as is" if size is None else f"data.size={size}"
    logger.info(
        f"selfsup: {folder}: {len(files)} images ({modes}), shorter sides {low}..{high} px "
        f"(median {median}), {labelled}: {resized}, data.channels={channels} "
        f"({'grayscale' if channels == 1 else 'RGB'}), written to the run's config.yaml"
    )
    # an absolute root: the run evaluates and replays from any working folder
    return {**spec, "root": str(root.resolve()), "size": size, "channels": channels}


def held_out(labels: np.ndarray, fraction: float, seed: int = FOLDER_SPLIT_SEED) -> np.ndarray:
    """A bool mask (N,) of the test images: round(fraction · n_c) of each class c with n_c
    images (at least one, and never all of them), the first of a permutation seeded by (seed, c)
    with a generator of its own."""
    test = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        order = np.random.default_rng([seed, int(label)]).permutation(members)
        test[order[:count]] = True
    return test


def check_fraction(fraction: Any) -> float | None:
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"data.test_fraction must be a number in (0, 1) or null, got {fraction!r}")
    if not 0 < fraction < 1:
        raise ValueError(f"data.test_fraction must be in (0, 1) or null, got {fraction}")
    return float(fraction)


def split_listing(
    root: Path, split: str, labels: str, test_fraction: float | None
) -> tuple[Path, list[Path], np.ndarray | None, list[str] | None]:
    """(folder, files, labels, classes) of split `split` of the image folder `root`: its own
    train/ and test/ (or val/) sub-folders when it has them; else the folder itself, of which a
    labelled one holds out `test_fraction` of each class as "test" (`held_out`)."""
    if has_split_folders(root):
        folder = root / split
        if split == "test" and not folder.is_dir():
            folder = root / "val"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"dataset 'image_folder': no '{split}' split under {root}: looked for "
                f"{root / split}" + (f", {root / 'val'}" if split == "test" else "")
            )
        return (folder, *formats.folder_listing(folder, labels))
    files, ids, classes = formats.folder_listing(root, labels)
    if ids is None or test_fraction is None:
        if split == "train":
            return root, files, ids, classes
        why = (
            "it has no labels (no class sub-folders)"
            if ids is None
            else "data.test_fraction is not set (e.g. data.test_fraction=0.2 holds out 20 % of "
            "each class)"
        )
        raise FileNotFoundError(
            f"dataset 'image_folder': {root} has no '{split}' split: {why}; a folder with "
            f"train/ and test/ sub-folders has its own"
        )
    test = held_out(ids, test_fraction)
    keep = test if split == "test" else ~test
    return root, [f for f, k in zip(files, keep, strict=True) if k], ids[keep], classes
