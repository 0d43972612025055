"""Readers of real dataset file formats -> uint8 numpy arrays in (N, C, H, W) layout.

Each reader takes a path, validates what it reads and raises ValueError naming the file and the
problem. Finding files and naming classes is `datasets.py`'s job.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# What PIL raises for a file it cannot decode: UnidentifiedImageError (an OSError) for a zero-byte
# or non-image file, OSError for a truncated one, SyntaxError / ValueError for broken headers.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# IDX type codes (third magic byte) -> big-endian dtype, http://yann.lecun.com/exdb/mnist/
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip-compressed (by content, not by name)."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: broken gzip stream ({error}); download it again") from error
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST, Fashion-MNIST), plain or .gz, as an array of the dims in its header."""
    data = read_bytes(path)
    # Header: two zero bytes, a type code, the number of dims, then each dim as big-endian uint32.
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'missing'}, expected "
            "0000 + type code 08..0e + number of dims); the file is corrupt or of another format"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: IDX header declares {ndim} dims but the file is too short")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header says shape {dims} ({expected} bytes of data) but the file holds "
            f"{len(data) - header}; the file is truncated or corrupt, download it again"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and plain containers, so a data file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles store bytes
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def read_pickle(path: str | Path) -> dict:
    """A CIFAR-style pickle (Python 2 era, bytes keys) as a dict, loading arrays only."""
    try:
        with open(path, "rb") as file:
            return _ArrayUnpickler(file, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({error})") from error


def read_cifar_batch(
    path: str | Path, label_key: bytes = b"labels"
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> images (N, 3, 32, 32) uint8, labels (N,) int64.

    The file stores each image as 3072 bytes: the red plane, then green, then blue, each row-major,
    so a reshape gives NCHW directly. CIFAR-100 uses `label_key=b"fine_labels"`.
    """
    batch = read_pickle(path)
    if b"data" not in batch or label_key not in batch:
        raise ValueError(
            f"{path}: CIFAR batch lacks b'data' or {label_key!r} (keys: {sorted(batch)})"
        )
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {len(labels)}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_names(path: str | Path, key: bytes) -> list[str]:
    """Class names from a CIFAR meta file: b'label_names' (CIFAR-10), b'fine_label_names' (100)."""
    meta = read_pickle(path)
    if key not in meta:
        raise ValueError(f"{path}: CIFAR meta lacks {key!r} (keys: {sorted(meta)})")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


STL_SHAPE = (3, 96, 96)


def read_stl_images(path: str | Path) -> np.ndarray:
    """An STL-10 `*_X.bin` file -> images (N, 3, 96, 96) uint8.

    The official files are written column-major (MATLAB order): each 96x96 plane holds its
    columns one after another, so H and W must be swapped after the reshape.
    """
    size = Path(path).stat().st_size
    per_image = int(np.prod(STL_SHAPE))
    if size % per_image:
        raise ValueError(
            f"{path}: {size} bytes is not a whole number of 96x96x3 images; the file is truncated"
        )
    # memmap + one copy keeps the peak at one copy of the data (the unlabeled split is 2.8 GB).
    raw = np.memmap(path, np.uint8, mode="r", shape=(size // per_image, *STL_SHAPE))
    return np.ascontiguousarray(raw.transpose(0, 1, 3, 2))


def read_stl_labels(path: str | Path) -> np.ndarray:
    """An STL-10 `*_y.bin` file (labels 1..10) -> labels (N,) int64 in 0..9."""
    labels = np.fromfile(path, np.uint8).astype(np.int64)
    if len(labels) and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(
            f"{path}: STL-10 labels must be 1..10, found {labels.min()}..{labels.max()}"
        )
    return labels - 1


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder` (by suffix, hidden files skipped), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit PNG / TIFF ("I": older Pillow)
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` in PIL mode 'L' or 'RGB'. 16-bit images are scaled to 8 bits (value / 257, so
    65535 -> 255): PIL's own convert clips them at 255, which turns most of a 16-bit image white.
    Transparent images are laid over white: dropping the alpha channel would show whatever
    colour the transparent pixels happen to hold (often black)."""
    if image.mode in WIDE_MODES:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257).astype(np.uint8), "L")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(
            Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA")
        )
    return image.convert(mode)


# How load_image turns a file into pixels. Part of the name of a decoded cache (data/cache.py):
# change it with any change to load_image or to_mode, so no cache of the old rule is reused.
DECODING = "to_mode 2026-12-01; shorter side to size, bilinear; centre square"


def load_image(path: Path, mode: str, size: int | None) -> np.ndarray:
    """One image in PIL mode 'L' or 'RGB' (`to_mode`) -> (C, H, W) uint8; with `size`, the
    shorter side is resized to `size` and the centre `size` x `size` square kept (aspect ratio
    preserved)."""
    with Image.open(path) as image:
        image = to_mode(image, mode)
    if size is not None:
        width, height = image.size
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


LABEL_RULES = ("auto", "folders", "none")


def folder_listing(
    root: str | Path, labels: str = "auto"
) -> tuple[list[Path], np.ndarray | None, list[str] | None]:
    """The image files of an image folder, their labels and the class names (None, None for an
    unlabeled folder), by the rule `labels` (data.labels):

    - "folders": each sub-folder of `root` is a class (sorted by name), its images found
      recursively; images directly in `root` are an error.
    - "none": every image under `root`, nested folders included, unlabeled.
    - "auto": "folders" when `root` has sub-folders with images and no images of its own, else
      "none" (images directly in `root`, with or without sub-folders beside them).

    Files are sorted by their path below `root`; hidden files and folders are skipped.
    """
    root = Path(root)
    if labels not in LABEL_RULES:
        raise ValueError(f"data.labels must be one of {', '.join(LABEL_RULES)}, got {labels!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [_images_below(d) if labels != "none" else [] for d in class_dirs]
    # Folders without images (e.g. a notes/ folder) are not classes.
    kept = [(d.name, files) for d, files in zip(class_dirs, per_class, strict=True) if files]
    loose = image_files(root)
    if labels == "folders" and kept and loose:
        raise ValueError(
            f"{root} has both class sub-folders ({', '.join(n for n, _ in kept[:3])}, ...) and "
            f"images directly inside ({loose[0].name}, ...); move the loose images into a class "
            "folder, or set data.labels=none to read every image as one unlabeled set"
        )
    if labels == "folders" and loose and not kept:
        raise ValueError(
            f"data.labels=folders takes the sub-folders of {root} as classes, and it has none "
            f"with images (only images directly inside, e.g. {loose[0].name}); put each class "
            "in a sub-folder, or set data.labels=none (or auto)"
        )
    if kept and (labels == "folders" or not loose):
        files = [f for _, class_files in kept for f in class_files]
        ids = np.concatenate([np.full(len(fs), i, np.int64) for i, (_, fs) in enumerate(kept)])
        return files, ids, [name for name, _ in kept]
    files = _images_below(root)
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root} or its sub-folders"
        )
    return files, None, None


def _images_below(folder: Path) -> list[Path]:
    """Image files in `folder` and every folder below it (hidden ones skipped), sorted by path."""
    return sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and f.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )


GRAY_MODES = {"1", "L", "LA", "La", "F", *WIDE_MODES}


def image_mode(path: Path) -> str | None:
    """The PIL mode of an image file (its header only), None if it cannot be read."""
    with contextlib.suppress(*UNREADABLE), Image.open(path) as image:
        return image.mode
    return None


def folder_mode(modes: Iterable[str | None], channels: int | None) -> str:
    """'L' or 'RGB' for images of these PIL modes: `channels` 1 or 3, or by default RGB unless
    all are grayscale (an unreadable file, None, is skipped where it is counted)."""
    if channels is None:
        return "L" if {m for m in modes if m is not None} <= GRAY_MODES else "RGB"
    if channels in (1, 3):
        return "L" if channels == 1 else "RGB"
    raise ValueError(f"channels must be 1, 3 or None (automatic), got {channels}")


def read_image_folder(
    root: str | Path, size: int | None = None, channels: int | None = None, labels: str = "auto"
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """A folder of images -> (images (N, C, H, W) uint8, labels or None, class names or None),
    in memory (`folder_listing` says which files and labels by the rule `labels`; data/cache.py
    maps large folders).

    `channels` 1 or 3 converts every image to L or RGB; by default RGB unless all are grayscale.
    """
    root = Path(root)
    files, ids, classes = folder_listing(root, labels)
    # Opening reads only the header, so choosing the mode first costs little.
    mode = folder_mode((image_mode(f) for f in files) if channels is None else (), channels)
    images, readable = read_images(files, root, mode, size)
    return images, ids[readable] if ids is not None else None, classes


def read_images(
    files: list[Path], root: Path, mode: str, size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The readable ones of `files` (below `root`, which messages name them by) in PIL mode
    `mode` -> (images (M, C, H, W) uint8, which of the files they are: a bool mask (N,)).
    Unreadable files are skipped and counted in one warning."""
    images, first, readable, skipped = None, None, np.zeros(len(files), bool), []
    for i, f in enumerate(files):
        try:
            image = load_image(f, mode, size)
        except UNREADABLE as error:
            skipped.append(f"{f.relative_to(root)} ({type(error).__name__}: {error})")
            continue
        if images is None:
            images, first = np.empty((len(files), *image.shape), np.uint8), f
        elif image.shape != images.shape[1:]:
            raise ValueError(
                f"images in {root} differ in size: {first.relative_to(root)} is "
                f"{images.shape[3]}x{images.shape[2]} but {f.relative_to(root)} is "
                f"{image.shape[2]}x{image.shape[1]}; pass size=N to resize every image (shorter "
                "side to N, centre crop to N x N)"
            )
        images[i], readable[i] = image, True
    if images is None:
        raise ValueError(
            f"none of the {len(files)} image files in {root} can be read, e.g. {skipped[0]}"
        )
    if skipped:
        logger.warning(
            f"selfsup: warning: skipped {len(skipped)} of {len(files)} image files in {root} "
            f"that cannot be read (corrupt, truncated or not images), e.g. {skipped[0]}"
        )
        images = images[readable]
    return images, readable


def to_nchw(images: np.ndarray, where: str = "array") -> np.ndarray:
    """Images in (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3} -> (N, C, H, W)."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        return images
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    raise ValueError(
        f"{where}: images of shape {images.shape} are not (N, H, W), (N, C, H, W) or (N, H, W, C) "
        "with 1 or 3 channels"
    )


def to_uint8(images: np.ndarray, where: str = "array") -> np.ndarray:
    """uint8 as is; integers in 0..255 cast; floats in [0, 1] scaled by 255, in [0, 255] rounded."""
    if images.dtype == np.uint8:
        return images
    low, high = (images.min(), images.max()) if images.size else (0, 0)
    if np.issubdtype(images.dtype, np.floating):
        if low >= 0 and high <= 1:
            images = images * 255.0
        elif not (low >= 0 and high <= 255):
            raise ValueError(
                f"{where}: float images must lie in [0, 1] or [0, 255], got {low}..{high}"
            )
        return np.rint(images).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer) and low >= 0 and high <= 255:
        return images.astype(np.uint8)
    raise ValueError(
        f"{where}: images of dtype {images.dtype} with values {low}..{high} are not pixels"
    )


def read_npz(
    path: str | Path,
    image_keys: tuple[str, ...] = ("images", "x"),
    label_keys: tuple[str, ...] = ("labels", "y"),
) -> tuple[np.ndarray, np.ndarray | None]:
    """An .npz file -> (images (N, C, H, W) uint8, labels (N,) int64 or None).

    The images are the first of `image_keys` present, the labels the first of `label_keys`.
    """
    with np.load(path, allow_pickle=False) as arrays:
        image_key = next((k for k in image_keys if k in arrays), None)
        if image_key is None:
            raise ValueError(
                f"{path}: no images array; expected one of {', '.join(image_keys)}, "
                f"found {', '.join(arrays.files) or 'nothing'}"
            )
        images = to_uint8(
            to_nchw(arrays[image_key], f"{path}[{image_key}]"), f"{path}[{image_key}]"
        )
        label_key = next((k for k in label_keys if k in arrays), None)
        labels = None if label_key is None else arrays[label_key].reshape(-1)
    if labels is not None:
        whole = np.issubdtype(labels.dtype, np.integer) or (
            np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0)
        )
        if not whole:
            raise ValueError(
                f"{path}[{label_key}]: labels must be integer class ids, got {labels.dtype} "
                f"values such as {labels[:3].tolist()}"
            )
        labels = labels.astype(np.int64)
        if len(labels) and labels.min() < 0:
            first = int(np.argmax(labels < 0))
            raise ValueError(
                f"{path}[{label_key}]: labels must be class ids from 0; image {first} has label "
                f"{labels[first]} (leave out the labels array for unlabelled images)"
            )
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images), labels
