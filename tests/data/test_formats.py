"""Dataset readers on small fixture files written here in each real on-disk format."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import formats
from selfsup.data.datasets import (
    FASHION_MNIST_CLASSES,
    ImageData,
    cifar10,
    cifar100,
    fashion_mnist,
    image_folder,
    mnist,
    npz,
    stl10,
    synthetic,
)
from selfsup.registry import DATASETS

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def pattern(n: int, *shape: int) -> np.ndarray:
    """n distinct uint8 images with no symmetry, so a flip or transpose changes them."""
    base = np.arange(int(np.prod(shape))).reshape(shape)
    return np.stack([(base * 7 + 13 * i) % 251 for i in range(n)]).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_mnist_like(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = pattern(n, 28, 28), np.arange(n, dtype=np.uint8) % 10
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_images_and_labels_round_trip(tmp_path, gz):
    images = pattern(3, 5, 7)
    write_idx(tmp_path / "images", images, gz)
    write_idx(tmp_path / "labels", np.array([4, 0, 9], np.uint8), gz)
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "images"), images)
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "labels"), [4, 0, 9])


def test_idx_with_wrong_magic_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x08\x03" + bytes(100)))
    with pytest.raises(ValueError, match="not an IDX file.*corrupt"):
        formats.read_idx(path)


def test_idx_shorter_than_its_header_says_is_reported_as_truncated(tmp_path):
    path = tmp_path / "images"
    write_idx(path, pattern(2, 4, 4), gz=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4\).*truncated"):
        formats.read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_both_splits_from_root(tmp_path, gz):
    arrays = write_mnist_like(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = fashion_mnist(split, root=str(tmp_path))
        images, labels = arrays[prefix]
        assert data.images.dtype == torch.uint8 and data.images.shape == (len(images), 1, 28, 28)
        np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(data.labels.numpy(), labels)
        assert data.labels.dtype == torch.int64
    assert data.classes == FASHION_MNIST_CLASSES
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert data.num_classes == 10 and data.shape == (1, 28, 28)


def test_mnist_is_found_through_selfsup_data_in_the_torchvision_layout(tmp_path, monkeypatch):
    arrays = write_mnist_like(tmp_path / "mnist" / "MNIST" / "raw")
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path))
    data = mnist("test")
    np.testing.assert_array_equal(data.images[:, 0].numpy(), arrays["t10k"][0])
    assert data.classes == [str(d) for d in range(10)]


def test_missing_dataset_error_lists_every_path_tried_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as error:
        mnist("train")
    message = str(error.value)
    for folder in (
        tmp_path / "data" / "mnist",
        Path("/usr/share/datasets/mnist"),
        tmp_path / "home" / ".cache" / "selfsup" / "mnist",
    ):
        assert str(folder) in message
    assert "train-images-idx3-ubyte" in message
    assert "http://yann.lecun.com/exdb/mnist/" in message
    assert "SELFSUP_DATA" in message and "root=" in message


def test_missing_fashion_mnist_under_explicit_root_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        fashion_mnist("train", root=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "/usr/share/datasets/fashion-mnist" in message


@pytest.mark.skipif(
    not SYSTEM_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist not done"
)
def test_real_fashion_mnist_train_split_loads_from_the_debian_package(monkeypatch):
    monkeypatch.delenv("SELFSUP_DATA", raising=False)
    data = fashion_mnist("train")
    assert data.images.shape == (60000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.num_classes == 10
    assert torch.bincount(data.labels).tolist() == [6000] * 10


def write_cifar(folder: Path, files: dict[str, int], label_key: bytes, protocol: int) -> dict:
    """Batches like the originals: dict with bytes keys, data (N, 3072) uint8, labels a list."""
    folder.mkdir(parents=True)
    written = {}
    for offset, (name, n) in enumerate(files.items()):
        images = pattern(n, 3, 32, 32) + offset
        labels = [(i + offset) % 10 for i in range(n)]
        batch = {b"batch_label": name.encode(), b"data": images.reshape(n, -1), label_key: labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (images, labels)
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_concatenates_train_batches_in_order_with_channel_planes(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)]
    written = write_cifar(folder, {**{n: 2 for n in names}, "test_batch": 3}, b"labels", protocol)
    classes = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    classes += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"label_names": classes, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))

    train = cifar10("train", root=str(tmp_path))
    np.testing.assert_array_equal(
        train.images.numpy(), np.concatenate([written[n][0] for n in names])
    )
    assert train.labels.tolist() == sum((written[n][1] for n in names), [])
    assert train.classes[1] == "automobile" and train.num_classes == 10
    # The first 1024 bytes of a record are the red plane, row by row.
    first_record = written["data_batch_1"][0][0].reshape(-1)
    np.testing.assert_array_equal(train.images[0, 0, 0].numpy(), first_record[:32])
    np.testing.assert_array_equal(train.images[0, 1, 0].numpy(), first_record[1024:1056])

    test = cifar10("test", root=str(folder))  # root may also be the unpacked folder itself
    np.testing.assert_array_equal(test.images.numpy(), written["test_batch"][0])


def test_cifar100_uses_fine_labels_and_names_from_meta(tmp_path):
    folder = tmp_path / "cifar-100-python"
    written = write_cifar(folder, {"train": 4, "test": 2}, b"fine_labels", 2)
    names = [f"class{i:02d}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=2))
    test = cifar100("test", root=str(tmp_path))
    np.testing.assert_array_equal(test.images.numpy(), written["test"][0])
    assert test.labels.tolist() == written["test"][1]
    assert test.classes[7] == "class07" and test.num_classes == 100


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"cos\nsystem\n(S'echo hacked'\ntR.")  # protocol-0 call of os.system
    with pytest.raises(ValueError, match="refusing to load os.system"):
        formats.read_cifar_batch(path)


def write_stl(folder: Path, split: str, images: np.ndarray, labels: list[int] | None) -> None:
    # The official files hold each channel plane column by column (MATLAB order).
    np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tofile(folder / f"{split}_X.bin")
    if labels is not None:
        np.array(labels, np.uint8).tofile(folder / f"{split}_y.bin")


def test_stl10_undoes_the_column_major_layout_and_shifts_labels(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    train, unlabeled = pattern(2, 3, 96, 96), pattern(3, 3, 96, 96)[::-1].copy()
    write_stl(folder, "train", train, [1, 10])
    write_stl(folder, "unlabeled", unlabeled, None)

    data = stl10("train", root=str(tmp_path))
    np.testing.assert_array_equal(data.images.numpy(), train)
    assert data.labels.tolist() == [0, 9] and data.classes[0] == "airplane"
    # The official reader: reshape (-1, 3, 96, 96), transpose (0, 3, 2, 1) -> (N, H, W, C).
    raw = np.fromfile(folder / "train_X.bin", np.uint8).reshape(-1, 3, 96, 96)
    np.testing.assert_array_equal(
        data.images.permute(0, 2, 3, 1).numpy(), raw.transpose(0, 3, 2, 1)
    )

    only = stl10("unlabeled", root=str(folder))
    np.testing.assert_array_equal(only.images.numpy(), unlabeled)
    assert only.labels is None
    both = stl10("train+unlabeled", root=str(tmp_path))
    assert len(both) == 5 and both.labels.tolist() == [0, 9, -1, -1, -1]
    assert both.num_classes == 10


def test_stl10_labels_outside_1_to_10_are_rejected(tmp_path):
    write_stl(tmp_path, "test", pattern(1, 3, 96, 96), [0])
    with pytest.raises(ValueError, match="1..10"):
        stl10("test", root=str(tmp_path))


def save_png(path: Path, array_chw: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = array_chw[0] if array_chw.shape[0] == 1 else array_chw.transpose(1, 2, 0)
    Image.fromarray(array).save(path)


def test_image_folder_labels_sorted_subfolders_and_keeps_pixels_exact(tmp_path):
    cats, dogs = pattern(2, 3, 6, 9), pattern(3, 3, 6, 9)[1:]
    for i, image in enumerate(dogs):
        save_png(tmp_path / "dog" / f"{i}.png", image)
    for i, image in enumerate(cats):
        save_png(tmp_path / "cat" / f"{i}.png", image)
    (tmp_path / "notes").mkdir()  # a folder without images is not a class
    (tmp_path / "notes" / "readme.txt").write_text("not an image")

    data = image_folder(root=str(tmp_path))
    assert data.classes == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.shape == (3, 6, 9)
    np.testing.assert_array_equal(data.images.numpy(), np.concatenate([cats, dogs]))


def test_image_folder_of_loose_grayscale_images_is_unlabeled_with_one_channel(tmp_path):
    images = pattern(3, 1, 5, 8)
    for i, image in enumerate(images):
        save_png(tmp_path / f"img{i}.png", image)
    data = image_folder(root=str(tmp_path))
    assert data.labels is None and data.classes is None and data.num_classes is None
    np.testing.assert_array_equal(data.images.numpy(), images)
    assert image_folder(root=str(tmp_path), channels=3).shape == (3, 5, 8)


def test_image_folder_with_mixed_sizes_needs_size_and_then_stacks(tmp_path):
    save_png(tmp_path / "a.png", pattern(1, 3, 20, 30)[0])
    save_png(tmp_path / "b.png", pattern(1, 3, 16, 16)[0])
    with pytest.raises(ValueError, match="differ in size.*size="):
        image_folder(root=str(tmp_path))
    data = image_folder(root=str(tmp_path), size=12)
    assert data.images.shape == (2, 3, 12, 12)


def test_image_folder_reads_each_split_from_its_own_subfolder(tmp_path):
    save_png(tmp_path / "train" / "a" / "0.png", pattern(1, 3, 4, 4)[0])
    save_png(tmp_path / "val" / "a" / "0.png", pattern(2, 3, 4, 4)[1])
    np.testing.assert_array_equal(
        image_folder("test", str(tmp_path)).images[0], pattern(2, 3, 4, 4)[1]
    )
    assert image_folder("train", str(tmp_path)).classes == ["a"]


def test_single_image_folder_refuses_to_serve_as_test_split(tmp_path):
    save_png(tmp_path / "a" / "0.png", pattern(1, 3, 4, 4)[0])
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        image_folder("test", str(tmp_path))


@pytest.mark.parametrize(
    "layout",
    ["nchw", "nhwc", "nhw", "float01"],
)
def test_npz_accepts_common_layouts_and_returns_nchw_uint8(tmp_path, layout):
    images = pattern(4, 3, 5, 6) if layout != "nhw" else pattern(4, 1, 5, 6)
    stored = {
        "nchw": images,
        "nhwc": images.transpose(0, 2, 3, 1),
        "nhw": images[:, 0],
        "float01": images.astype(np.float32) / 255,
    }[layout]
    np.savez(tmp_path / "data.npz", x=stored, y=np.array([3, 1, 2, 0]))
    data = npz(root=str(tmp_path / "data.npz"))
    assert data.images.dtype == torch.uint8
    np.testing.assert_array_equal(data.images.numpy(), images)
    assert data.labels.tolist() == [3, 1, 2, 0]


def test_npz_splits_come_from_keras_style_keys_or_files(tmp_path):
    train, test = pattern(3, 1, 4, 4), pattern(2, 1, 4, 4)
    np.savez(tmp_path / "mnist.npz", x_train=train[:, 0], y_train=[0, 1, 2], x_test=test[:, 0])
    np.testing.assert_array_equal(npz("test", str(tmp_path / "mnist.npz")).images.numpy(), test)
    assert npz("train", str(tmp_path / "mnist.npz")).labels.tolist() == [0, 1, 2]

    folder = tmp_path / "split"
    folder.mkdir()
    np.savez(folder / "train.npz", images=train)
    np.savez(folder / "test.npz", images=test)
    np.testing.assert_array_equal(npz("test", str(folder)).images.numpy(), test)


def test_single_split_npz_refuses_to_serve_as_test_split(tmp_path):
    np.savez(tmp_path / "data.npz", images=pattern(2, 1, 4, 4))
    with pytest.raises(FileNotFoundError, match="served as 'train' only"):
        npz("test", str(tmp_path / "data.npz"))


def test_npz_without_an_images_array_names_the_keys_it_found(tmp_path):
    np.savez(tmp_path / "data.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="images, x.*pixels"):
        npz(root=str(tmp_path / "data.npz"))


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = synthetic("train", seed=3, per_class=5), synthetic("train", seed=3, per_class=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, synthetic("test", seed=3, per_class=5).images)
    assert not torch.equal(a.images, synthetic("train", seed=4, per_class=5).images)
    rgb = synthetic(num_classes=4, size=32, channels=3, per_class=6)
    assert rgb.images.shape == (24, 3, 32, 32) and rgb.num_classes == 4
    assert torch.bincount(rgb.labels).tolist() == [6] * 4


def test_synthetic_classes_are_separable_by_knn_on_pixels_but_not_perfectly():
    train, test = synthetic("train", per_class=50), synthetic("test", per_class=20)
    x_train, x_test = (d.images.flatten(1).float() for d in (train, test))
    mean = x_train.mean(0)
    x_train = torch.nn.functional.normalize(x_train - mean, dim=1)
    x_test = torch.nn.functional.normalize(x_test - mean, dim=1)
    predicted = train.labels[(x_test @ x_train.T).argmax(1)]
    accuracy = (predicted == test.labels).float().mean().item()
    assert 0.5 < accuracy < 1.0  # chance is 0.1


def test_image_data_validates_dtype_and_computes_channel_stats():
    with pytest.raises(ValueError, match="uint8"):
        ImageData(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))
    images = torch.from_numpy(pattern(5, 3, 4, 4))
    mean, std = ImageData(images).mean_std()
    pixels = images.double().div(255).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(mean, pixels.mean(1).numpy())
    np.testing.assert_allclose(std, pixels.std(1, unbiased=False).numpy())


def test_every_dataset_is_registered_and_bad_splits_list_the_valid_ones():
    expected = {"cifar10", "cifar100", "fashion_mnist", "image_folder", "mnist", "npz", "stl10"}
    assert expected | {"synthetic"} <= set(DATASETS.names())
    with pytest.raises(ValueError, match="valid: train, test, unlabeled, train\\+unlabeled"):
        stl10("val", root=os.devnull)
