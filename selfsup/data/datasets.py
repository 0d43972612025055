"""DATASETS: name -> reader returning `ImageData` (uint8 images, labels, class names).

Files are looked up in order: an explicit `root` (then only there), `$SELFSUP_DATA/<name>`, the
system path a package installs to, `~/.cache/selfsup/<name>`. Nothing is ever downloaded: a
missing dataset raises FileNotFoundError listing every path tried and how to get the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfsup.data import folder, formats, memory
from selfsup.registry import DATASETS


@dataclass
class ImageData:
    """A whole split in memory: images uint8 (N, C, H, W), labels int64 (N,) or None."""

    images: Tensor
    labels: Tensor | None = None
    classes: list[str] | None = None
    # per-channel (mean, std) when known without reading every image (a memory-mapped cache)
    stats: tuple[list[float], list[float]] | None = None
    mapped: bool = False  # images are a memory-mapped file: batches go to the device one by one
    files: list[str] | None = None  # each image's file (an image folder's): neighbours name it

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                "images must be uint8 (N, C, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        self.images = self.images.contiguous()
        if self.labels is not None:
            self.labels = self.labels.long()
            if self.labels.shape != (len(self.images),):
                raise ValueError(
                    f"labels must be ({len(self.images)},), got {tuple(self.labels.shape)}"
                )
            # -1 marks an unlabelled image in a partly labelled split (STL-10 train+unlabeled)
            limit = len(self.classes) if self.classes is not None else None
            bad = (self.labels < -1) | (self.labels >= limit if limit else False)
            if bad.any():
                first = int(bad.nonzero()[0, 0])
                allowed = f"0..{limit - 1}" if limit else "0 or more"
                raise ValueError(
                    f"labels must be class ids {allowed}; image {first} has label "
                    f"{int(self.labels[first])}: renumber the classes from 0"
                )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int | None:
        if self.classes is not None:
            return len(self.classes)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the pixels scaled to [0, 1] (for `normalize`)."""
        if self.stats is not None:
            return self.stats
        total = torch.zeros(self.shape[0], dtype=torch.float64)
        squares = torch.zeros_like(total)
        # Chunks keep the float copy small for large splits (STL-10 unlabeled is 2.8 GB as uint8).
        for chunk in self.images.split(4096):
            x = chunk.double().div_(255).transpose(0, 1).reshape(self.shape[0], -1)
            total += x.sum(1)
            squares += x.square().sum(1)
        count = self.images.numel() / self.shape[0]
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        return mean.tolist(), std.tolist()


def image_data(
    images: np.ndarray, labels: np.ndarray | None = None, classes: list[str] | None = None
) -> ImageData:
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # e.g. np.frombuffer over bytes; torch needs writable memory
        images = images.copy()
    return ImageData(
        torch.from_numpy(images),
        None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        classes,
    )


def check_split(name: str, split: str, valid: Sequence[str] = ("train", "test")) -> None:
    if split not in valid:
        raise ValueError(f"{name} has no split '{split}'; valid: {', '.join(valid)}")


def candidate_dirs(name: str, root: str | None, system: Sequence[str] = ()) -> list[Path]:
    """Directories to search for dataset `name`, in order (an explicit root is the only one)."""
    if root is not None:
        return [Path(root).expanduser()]
    dirs = []
    if os.environ.get("SELFSUP_DATA"):
        dirs.append(Path(os.environ["SELFSUP_DATA"]).expanduser() / name)
    dirs += [Path(p) for p in system]
    dirs.append(Path.home() / ".cache" / "selfsup" / name)
    return dirs


def find_files(
    name: str,
    root: str | None,
    files: Sequence[str],
    how_to_get: str,
    system: Sequence[str] = (),
    subdirs: Sequence[str] = ("",),
    gz: bool = False,
) -> dict[str, Path]:
    """Find the folder holding all `files` (each also as `.gz` when `gz`) -> {file: path}.

    Each candidate directory is tried as is and with each of `subdirs` (the folder an archive
    unpacks to), so `root` may point at the dataset folder or at its parent.
    """
    tried = []
    for base in candidate_dirs(name, root, system):
        for sub in subdirs:
            folder = base / sub if sub else base
            tried.append(folder)
            found = {}
            for file in files:
                options = [folder / file, folder / f"{file}.gz"] if gz else [folder / file]
                path = next((p for p in options if p.is_file()), None)
                if path is None:
                    break
                found[file] = path
            else:
                return found
    listing = "\n".join(f"  {p}" for p in tried)
    raise FileNotFoundError(
        f"dataset '{name}' not found: needs {', '.join(files)}{' (or .gz)' if gz else ''}; "
        f"looked in\n{listing}\n{how_to_get}\n"
        f"Then put the files in one of those folders, set SELFSUP_DATA=<dir> to use "
        f"<dir>/{name}, or pass root=<folder>."
    )


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"
]  # fmt: skip


def read_idx_pair(name: str, split: str, root: str | None, how_to_get: str, **where) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    image_file, label_file = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    paths = find_files(name, root, [image_file, label_file], how_to_get, gz=True, **where)
    images, labels = formats.read_idx(paths[image_file]), formats.read_idx(paths[label_file])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{paths[image_file]} and {paths[label_file]} do not match: images {images.shape}, "
            f"labels {labels.shape}; expected (N, H, W) and (N,)"
        )
    return images[:, None], labels


@DATASETS.register("fashion_mnist")
def fashion_mnist(split: str = "train", root: str | None = None) -> ImageData:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grayscale, 10 clothing classes, 60k/10k."""
    check_split("fashion_mnist", split)
    how = (
        "Get it with: apt-get install dataset-fashion-mnist (Debian; installs "
        "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz and the other three files), "
        "or from https://github.com/zalandoresearch/fashion-mnist (the four *-ubyte.gz files)."
    )
    images, labels = read_idx_pair(
        "fashion_mnist", split, root, how,
        system=["/usr/share/datasets/fashion-mnist"],
        subdirs=["", "fashion-mnist", "FashionMNIST/raw"],
    )  # fmt: skip
    return image_data(images, labels, list(FASHION_MNIST_CLASSES))


@DATASETS.register("mnist")
def mnist(split: str = "train", root: str | None = None) -> ImageData:
    """MNIST (LeCun et al. 1998): 28x28 grayscale handwritten digits, 60k/10k."""
    check_split("mnist", split)
    how = (
        "Get the four *-ubyte.gz files from the page http://yann.lecun.com/exdb/mnist/ "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)."
    )
    images, labels = read_idx_pair(
        "mnist", split, root, how, system=["/usr/share/datasets/mnist"],
        subdirs=["", "mnist", "MNIST/raw"],
    )  # fmt: skip
    return image_data(images, labels, [str(d) for d in range(10)])


@DATASETS.register("cifar10")
def cifar10(split: str = "train", root: str | None = None) -> ImageData:
    """CIFAR-10 (Krizhevsky 2009): 32x32 RGB, 10 classes, 50k/10k, python pickle version."""
    check_split("cifar10", split)
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    how = (
        "Get 'CIFAR-10 python version' (cifar-10-python.tar.gz) from the page "
        "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it (tar xzf) to "
        "cifar-10-batches-py/."
    )
    paths = find_files(
        "cifar10", root, [*batches, "batches.meta"], how, subdirs=["", "cifar-10-batches-py"]
    )
    parts = [formats.read_cifar_batch(paths[b]) for b in batches]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return image_data(
        images, labels, formats.read_cifar_names(paths["batches.meta"], b"label_names")
    )


@DATASETS.register("cifar100")
def cifar100(split: str = "train", root: str | None = None) -> ImageData:
    """CIFAR-100 (Krizhevsky 2009): 32x32 RGB, 100 fine classes, 50k/10k, python pickle version."""
    check_split("cifar100", split)
    how = (
        "Get 'CIFAR-100 python version' (cifar-100-python.tar.gz) from the page "
        "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it (tar xzf) to cifar-100-python/."
    )
    paths = find_files("cifar100", root, [split, "meta"], how, subdirs=["", "cifar-100-python"])
    images, labels = formats.read_cifar_batch(paths[split], label_key=b"fine_labels")
    return image_data(images, labels, formats.read_cifar_names(paths["meta"], b"fine_label_names"))


@DATASETS.register("stl10")
def stl10(split: str = "train", root: str | None = None) -> ImageData:
    """STL-10 (Coates et al. 2011): 96x96 RGB, 10 classes, 5k/8k labelled + 100k unlabeled.

    "train+unlabeled" labels the unlabeled images -1 (as torchvision does); "unlabeled" has none.
    """
    check_split("stl10", split, ("train", "test", "unlabeled", "train+unlabeled"))
    how = (
        "Get the binary version (stl10_binary.tar.gz) from the page "
        "https://cs.stanford.edu/~acoates/stl10/ and unpack it (tar xzf) to stl10_binary/."
    )
    parts = split.split("+")
    files = [f"{p}_X.bin" for p in parts] + [f"{p}_y.bin" for p in parts if p != "unlabeled"]
    paths = find_files("stl10", root, files, how, subdirs=["", "stl10_binary"])
    images = [formats.read_stl_images(paths[f"{p}_X.bin"]) for p in parts]
    if split == "unlabeled":
        return image_data(images[0], None, None)
    labels = [
        formats.read_stl_labels(paths[f"{p}_y.bin"]) if p != "unlabeled" else np.full(len(x), -1)
        for p, x in zip(parts, images, strict=True)
    ]
    for p, x, y in zip(parts, images, labels, strict=True):
        if len(x) != len(y):
            raise ValueError(f"STL-10 {p}: {len(x)} images but {len(y)} labels")
    names_file = next(iter(paths.values())).parent / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else list(STL10_CLASSES)
    images = images[0] if len(images) == 1 else np.concatenate(images)
    return image_data(images, np.concatenate(labels), classes)


DIGITS_SIZE = 28  # MNIST's side, so a digits split can stand in for MNIST-sized data
DIGITS_TEST_FRACTION = 0.2  # per class, rounded: 1,438 train / 359 test of 1,797
DIGITS_SPLIT_SEED = 0  # fixed, so that every run is evaluated on the same test images


@DATASETS.register("digits")
def digits(split: str = "train", root: str | None = None) -> ImageData:
    """scikit-learn's 8x8 handwritten digits (the UCI optdigits test set; Alpaydin & Kaynak 1998),
    upsampled to 28x28: 1,797 grayscale images, 10 classes, split 1,438 train / 359 test.

    Each 8x8 pixel counts the ink of a 4x4 block of a 32x32 bitmap (integers 0..16); it is
    scaled to 0..255 and upsampled bilinearly (align_corners=False, the same filter as the eval
    transform's resize; antialias only matters when shrinking). Bilinear interpolates between
    neighbours, so values stay within 0..255, where bicubic overshoots and draws dark rings
    around strokes. The digit fills the whole image (MNIST's sits in a 20x20 box). The split is
    fixed: per class, a seeded permutation puts round(0.2 n_c) images in test. scikit-learn (the
    optional extra `digits`) reads them from a file inside its own wheel: nothing is downloaded.
    `root` is ignored.
    """
    check_split("digits", split)
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        # FileNotFoundError as for every missing dataset: the images ship with scikit-learn.
        raise FileNotFoundError(
            "dataset 'digits' is read by scikit-learn, which is not installed; install it with "
            "pip install 'selfsup[digits]' (or pip install scikit-learn)"
        ) from error
    bunch = load_digits()
    small = torch.from_numpy(bunch.images).float()[:, None] / 16  # (1797, 1, 8, 8) in [0, 1]
    large = torch.nn.functional.interpolate(
        small, size=DIGITS_SIZE, mode="bilinear", align_corners=False, antialias=False
    )
    images = large.mul_(255).round_().to(torch.uint8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    in_test = np.zeros(len(labels), dtype=bool)
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        in_test[members[: round(DIGITS_TEST_FRACTION * len(members))]] = True
    keep = in_test if split == "test" else ~in_test
    return ImageData(
        images[torch.from_numpy(keep)], torch.from_numpy(labels[keep]), [str(d) for d in range(10)]
    )


def split_path(name: str, root: str | None, split: str, suffix: str = "") -> Path:
    """The file or folder a user-supplied dataset reads for `split`.

    A folder `root` may hold one entry per split (`train<suffix>`, `test<suffix>` or `val<suffix>`
    for test); otherwise `root` itself is the train split only, so that evaluating on "test"
    never silently reuses the training images.
    """
    if root is None:
        raise ValueError(f"dataset '{name}' needs root=<path to your data>")
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"dataset '{name}': {root_path} does not exist")
    if root_path.is_file():
        return root_path
    per_split = [
        root_path / f"{n}{suffix}" for n in ([split] + (["val"] if split == "test" else []))
    ]
    found = next((p for p in per_split if p.exists()), None)
    if found is not None:
        return found
    has_splits = any((root_path / f"{n}{suffix}").exists() for n in ("train", "test", "val"))
    if split == "train" and not has_splits and not suffix:
        return root_path
    raise FileNotFoundError(
        f"dataset '{name}': no '{split}' split under {root_path}: looked for "
        f"{', '.join(str(p) for p in per_split)}"
        + ("; a single folder is the train split only" if not suffix else "")
    )


@DATASETS.register("image_folder")
def image_folder(
    split: str = "train",
    root: str | None = None,
    size: int | str | None = None,
    channels: int | str | None = None,
    labels: str = "auto",
    test_fraction: float | None = None,
    cache: str | None = None,
    workers: int | None = None,
) -> ImageData:
    """Your own images: root/<class>/*.png (labelled) or root/**/*.png (unlabeled), via Pillow.

    With root/train and root/test (or root/val) sub-folders, each split reads its own; else a
    labelled folder holds out `test_fraction` of each class as its test split (seeded, the same
    for every run). `labels`: auto | folders (sub-folders are classes) | none (every image under
    root, unlabeled); formats.folder_listing. `size` resizes the shorter side and centre-crops to
    size x size; `channels` 1 or 3 forces L or RGB; `auto` decides either from the image headers
    (data/folder.py; a run writes the numbers into its config.yaml). 16-bit images are scaled to
    8 bits, transparent ones laid over white. `cache` (a folder): for sets larger than memory,
    decode once with `workers` processes (default: one per core) into a memory-mapped file there
    and train from it (data/cache.py).
    """
    check_split("image_folder", split)
    folder.check_size(size)
    base = folder.check_root(root)
    where, files, ids, classes = folder.split_listing(
        base, split, labels, folder.check_fraction(test_fraction)
    )
    if size == folder.AUTO or channels == folder.AUTO:
        size, channels, _ = folder.decide(files, size, channels)
    channels = folder.channel_setting(channels)
    if cache is None:
        mode = formats.folder_mode(
            (formats.image_mode(f) for f in files) if channels is None else (), channels
        )
        images, readable = formats.read_images(files, where, mode, size)
        kept = [f for f, ok in zip(files, readable, strict=True) if ok]
        data = image_data(images, ids[readable] if ids is not None else None, classes)
    else:
        from selfsup.data.cache import cached_image_folder

        mapped, ids, classes, stats, kept = cached_image_folder(
            where, size, channels, cache, workers, listing=(files, ids, classes)
        )
        ids = None if ids is None else torch.from_numpy(ids)
        data = ImageData(torch.from_numpy(mapped), ids, classes, stats, mapped=True)
    data.files = [str(f) for f in kept]
    return data


# Datasets that decide settings from their files (image_folder's data.size: auto): name -> a
# function of the spec returning it with the decided values, which a new run writes into its
# config.yaml (build.settle_data), so that the run replays and evaluates the same way.
SETTLE: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "image_folder": folder.settle,
    "array": memory.settle,
}


@DATASETS.register("array")
def array(
    split: str = "train",
    key: str | None = None,
    shape: list[int] | None = None,
    labelled: bool = False,
    size: int | str | None = folder.AUTO,
    test_fraction: float | None = None,
) -> ImageData:
    """Images given in memory: selfsup.train(method, data=images, labels=labels) (data/memory.py).

    `key` names the arrays kept in this process, `shape` and `labelled` describe them. `size`
    resizes the centre square (auto: the shorter side, at most 64 px); labelled arrays hold out
    `test_fraction` of each class as the test split (seeded, as an image folder's).
    """
    check_split("array", split)
    folder.check_size(size)
    fraction = folder.check_fraction(test_fraction)
    images, ids = memory.recall(key, shape)
    if size == folder.AUTO:
        size = min(images.shape[2], images.shape[3], folder.AUTO_MAX_SIZE)
    if size is not None:
        images = memory.resize(images, size)
    classes = None if ids is None else [str(c) for c in range(int(ids.max()) + 1)]
    if ids is None or fraction is None:
        if split != "train":
            why = "no labels" if ids is None else "labels= without data.test_fraction"
            raise FileNotFoundError(
                f"dataset 'array': the images in memory have no '{split}' split ({why})"
            )
        return ImageData(images, ids, classes)
    test = torch.from_numpy(folder.held_out(ids.numpy(), fraction))
    keep = test if split == "test" else ~test
    return ImageData(images[keep], ids[keep], classes)


@DATASETS.register("npz")
def npz(split: str = "train", root: str | None = None) -> ImageData:
    """NumPy arrays: a .npz with `images` (or `x`) and optional `labels` (or `y`).

    Images may be (N, H, W), (N, C, H, W) or (N, H, W, C), uint8 or floats in [0, 1]. Splits come
    from keys `x_train`/`x_test` (as in Keras' mnist.npz) or from root/train.npz, root/test.npz.
    """
    check_split("npz", split)
    path = split_path("npz", root, split, suffix=".npz")
    with np.load(path, allow_pickle=False) as arrays:
        split_keys = [k for k in arrays.files if k.startswith(("x_", "images_"))]
    if split_keys:
        return image_data(
            *formats.read_npz(
                path, (f"images_{split}", f"x_{split}"), (f"labels_{split}", f"y_{split}")
            ),
            None,
        )
    if split != "train" and path == Path(root).expanduser():
        raise FileNotFoundError(
            f"dataset 'npz': {path} holds one split (no x_{split} / images_{split} array), "
            f"served as 'train' only; add x_{split} or use a folder with train.npz and {split}.npz"
        )
    return image_data(*formats.read_npz(path), None)


@DATASETS.register("synthetic")
def synthetic(
    split: str = "train",
    root: str | None = None,
    num_classes: int = 10,
    size: int = 28,
    channels: int = 1,
    per_class: int = 100,
    seed: int = 0,
) -> ImageData:
    """Generated images for tests and demos: each class is a fixed layout of three oriented bars.

    Every sample shifts the layout by up to size/8 pixels, jitters each bar's angle and place,
    varies contrast and adds a random distractor blob and pixel noise: a tiny CNN or kNN on pixels
    separates the classes well above chance, but not perfectly. The class layouts depend on `seed`
    only; train and test samples come from different streams of it. `root` is ignored.
    """
    check_split("synthetic", split)
    layout_rng = np.random.default_rng([seed, 0])
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    bars = 3
    # Class layouts: bar centres in the middle 60 % of the image, angle, length, width, colour.
    centre = layout_rng.uniform(0.2, 0.8, (num_classes, bars, 2)) * size
    angle = layout_rng.uniform(0, np.pi, (num_classes, bars))
    length = layout_rng.uniform(0.12, 0.25, (num_classes, bars)) * size
    colour = layout_rng.uniform(0.4, 1.0, (num_classes, bars, channels))

    n = num_classes * per_class
    labels = np.repeat(np.arange(num_classes), per_class)
    shift = rng.uniform(-size / 8, size / 8, (n, 1, 2))
    cx, cy = np.moveaxis(centre[labels] + shift + rng.normal(0, size / 40, (n, bars, 2)), -1, 0)
    theta = angle[labels] + rng.normal(0, 0.15, (n, bars))
    contrast = rng.uniform(0.6, 1.0, (n, 1, 1, 1))
    blob = rng.uniform(0, size, (n, 2))
    blob_amp = rng.uniform(0.3, 0.7, (n, 1, 1))

    y, x = np.mgrid[:size, :size].astype(np.float32)
    images = np.zeros((n, channels, size, size), np.float32)
    for b in range(bars):
        dx, dy = x - cx[:, b, None, None], y - cy[:, b, None, None]
        cos, sin = np.cos(theta[:, b, None, None]), np.sin(theta[:, b, None, None])
        along, across = dx * cos + dy * sin, -dx * sin + dy * cos
        half_width = max(size / 28, 0.75)
        bar = np.exp(
            -0.5 * ((along / length[labels, b, None, None]) ** 4 + (across / half_width) ** 2)
        )
        images += bar[:, None] * colour[labels, b, :, None, None]
    distractor = np.exp(
        -((x - blob[:, 0, None, None]) ** 2 + (y - blob[:, 1, None, None]) ** 2)
        / (2 * (size / 10) ** 2)
    )
    images = images.clip(0, 1) * contrast + (blob_amp * distractor)[:, None]
    images += rng.normal(0, 0.1, images.shape)
    images = np.rint(images.clip(0, 1) * 255).astype(np.uint8)
    classes = [f"layout {c}" for c in range(num_classes)]
    return image_data(images, labels, classes)
