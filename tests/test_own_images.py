"""Your own images, start to finish, through the command line: a folder of mixed images (RGB
jpg/png of different sizes, grey, RGBA, 16-bit, nested folders) trains with a <method>/folder
recipe, then embeds, finds neighbours, exports and reports (docs/own_images.md)."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selfsup.cli import main
from selfsup.config import recipe_names
from selfsup.data import folder, formats
from selfsup.registry import DATASETS

TINY = [
    "train.max_steps=2",
    "train.epochs=1",
    "train.budget_minutes=null",
    "train.progress=false",
    "optim.batch_size=8",
    "backbone.width=0.125",
    "eval.knn_k=5",
    "eval.linear_epochs=5",
]


def _image(rng, kind, width, height):
    """One image of a kind every folder of photos and scans has: RGB (jpg, png), grey, RGBA
    (half transparent), 16-bit grey."""
    if kind in ("jpg", "png"):
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if kind == "grey":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    if kind == "rgba":
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        pixels[: height // 2, :, 3] = 0
        return Image.fromarray(pixels, "RGBA")
    return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))


def mixed_folder(root, classes=(), per_class=20, seed=0):
    """A folder of per_class images (or per_class in each class sub-folder), of every kind and of
    sizes 12..33 px, every third one in a nested folder; returns the image paths."""
    rng = np.random.default_rng(seed)
    kinds = ["jpg", "png", "grey", "rgba", "16bit"]
    paths = []
    for name in classes or [""]:
        for i in range(per_class):
            kind = kinds[i % len(kinds)]
            sub = root / name / ("nested/deeper" if i % 3 == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"{kind}_{i}.{'jpg' if kind == 'jpg' else 'png'}"
            _image(rng, kind, int(rng.integers(12, 34)), int(rng.integers(12, 34))).save(path)
            paths.append(path)
    return paths


def _run_folder(out, capsys):
    printed = capsys.readouterr()
    line = next(x for x in printed.out.splitlines() if x.startswith("run folder: "))
    return out / line.removeprefix("run folder: ").split("/")[-1], printed.err


def _shorter_sides(paths):
    sides = []
    for path in paths:
        with Image.open(path) as image:
            sides.append(min(image.size))
    return sides


def test_an_unlabelled_folder_trains_embeds_finds_neighbours_exports_and_reports(tmp_path, capsys):
    images = tmp_path / "photos"
    paths = mixed_folder(images, per_class=20)
    out = tmp_path / "runs"
    argv = ["train", "simclr/folder", f"data.root={images}", f"train.out_dir={out}", *TINY]
    assert main(argv) == 0
    run, err = _run_folder(out, capsys)

    # size and channels chosen from the data, said in one line and written into config.yaml
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    size = min(int(np.median(_shorter_sides(paths))), folder.AUTO_MAX_SIZE)
    assert data["size"] == size and data["channels"] == 3
    assert data["root"] == str(images.resolve())
    assert "20 images" in err and f"data.size={size}, data.channels=3" in err
    assert "no labels" in err and "kNN monitor off: the training images have no labels" in err
    info = json.loads((run / "data.json").read_text())
    assert info["train_size"] == 20 and info["num_classes"] is None

    # the probes are skipped, saying why, instead of failing
    assert main(["eval", "all", str(run)]) == 0
    assert "probes skipped" in capsys.readouterr().err
    assert not (run / "eval.json").exists()

    assert main(["embed", str(run), str(images), "-o", str(tmp_path / "f.npy")]) == 0
    capsys.readouterr()
    assert np.load(tmp_path / "f.npy").shape[0] == 20

    query = paths[1]  # itself in the training images: never its own neighbour
    sheet, record = tmp_path / "sheet.png", tmp_path / "neighbours.json"
    assert main(["neighbours", str(run), str(query), "-k", "3", "-o", str(sheet)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query {query}" and len(lines) == 1 + 3 + 1  # query, 3, "wrote"
    named = [line.split()[-1] for line in lines[1:4]]
    assert all(name.startswith(str(images.resolve())) for name in named)
    assert str(query.resolve()) not in named
    similarities = [float(line.split()[1]) for line in lines[1:4]]
    assert similarities == sorted(similarities, reverse=True)
    with Image.open(sheet) as picture:
        assert picture.width > picture.height  # one row: the query and 3 neighbours
    assert main(["neighbours", str(run), str(query), "-k", "2", "-o", str(record)]) == 0
    capsys.readouterr()
    found = json.loads(record.read_text())["queries"][0]["neighbours"]
    assert [n["file"] for n in found] == named[:2]

    assert main(["export", str(run), "-o", str(tmp_path / "encoder.pt")]) == 0
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert state["conv1.weight"].shape[1] == 3

    page = tmp_path / "report.html"
    argv = ["report", str(run), "-o", str(page), "--map-images", "20", "--queries", "2"]
    assert main([*argv, "--neighbours", "3"]) == 0
    text = page.read_text()
    assert "Probes skipped" in text and "without labels" in text


def test_a_folder_of_classes_probes_images_held_out_from_training(tmp_path, capsys):
    images = tmp_path / "pets"
    mixed_folder(images, classes=("cat", "dog"), per_class=20)
    out = tmp_path / "runs"
    argv = ["train", "byol/folder", f"data.root={images}", f"train.out_dir={out}", *TINY]
    assert main(argv) == 0
    run, err = _run_folder(out, capsys)
    assert "2 classes from its sub-folders (cat, dog)" in err
    assert any("knn_top1" in line for line in (run / "metrics.jsonl").read_text().splitlines())

    assert main(["eval", "knn", str(run)]) == 0
    assert "knn_top1" in capsys.readouterr().out
    spec = {**yaml.safe_load((run / "config.yaml").read_text())["data"]}
    train, test = DATASETS.build(spec, split="train"), DATASETS.build(spec, split="test")
    assert (len(train), len(test)) == (32, 8)  # 20 % of each class held out
    assert test.labels.tolist() == [0] * 4 + [1] * 4
    assert not set(train.files) & set(test.files)

    page = tmp_path / "report.html"
    argv = ["report", str(run), "-o", str(page), "--map-images", "8", "--queries", "2"]
    assert main([*argv, "--neighbours", "3"]) == 0
    assert "% of the neighbours shown share the query" in page.read_text()


@pytest.mark.parametrize("name", [n for n in recipe_names() if n.endswith("/folder")])
def test_every_folder_recipe_trains_on_a_mixed_folder(tmp_path, name):
    import selfsup

    mixed_folder(tmp_path / "images", per_class=10)
    overrides = [f"data.root={tmp_path / 'images'}", f"train.out_dir={tmp_path}", *TINY]
    run = selfsup.train(name, [*overrides, "train.max_steps=1", "train.collapse_guard=false"])
    assert np.isfinite(next(r["loss"] for r in run.metrics if "loss" in r))


def test_the_folder_recipes_are_listed(capsys):
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    for method in ("simclr", "byol", "barlow_twins", "vicreg", "moco_v2", "dino", "swav"):
        assert f"{method}/folder" in listed
    assert "simsiam/folder" in listed and "size and channels from the data" in listed


def test_a_grey_folder_gets_one_channel_and_large_images_a_cpu_sized_side(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (120, 200), dtype=np.uint8), "L").save(
            tmp_path / f"{i}.png"
        )
    Image.fromarray(rng.integers(0, 65536, (150, 150), dtype=np.uint16)).save(tmp_path / "w.png")
    settled = folder.settle({"name": "image_folder", "root": str(tmp_path), "size": "auto"})
    assert settled["channels"] == 1 and settled["size"] == folder.AUTO_MAX_SIZE
    given = folder.settle({"root": str(tmp_path), "size": 32, "channels": 3})
    assert (given["size"], given["channels"]) == (32, 3)
    data = DATASETS.build({"name": "image_folder", "root": str(tmp_path), "size": "auto"})
    assert data.shape == (1, folder.AUTO_MAX_SIZE, folder.AUTO_MAX_SIZE)


def test_sixteen_bit_images_are_scaled_and_transparent_ones_laid_over_white(tmp_path):
    wide = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert formats.load_image(tmp_path / "wide.png", "L", None).tolist() == [[[0, 1, 128, 255]]]
    see_through = np.zeros((1, 2, 4), np.uint8)
    see_through[0, 1] = (10, 20, 30, 255)  # one opaque pixel beside a transparent black one
    Image.fromarray(see_through, "RGBA").save(tmp_path / "alpha.png")
    rgb = formats.load_image(tmp_path / "alpha.png", "RGB", None)
    assert rgb[:, 0, 0].tolist() == [255, 255, 255] and rgb[:, 0, 1].tolist() == [10, 20, 30]


def test_the_labels_rule_reads_nested_folders_as_one_unlabelled_set_or_as_classes(tmp_path):
    mixed_folder(tmp_path / "a", per_class=3)
    mixed_folder(tmp_path, per_class=2, seed=1)  # images directly in the root, beside a/
    files, labels, classes = formats.folder_listing(tmp_path)  # auto
    assert len(files) == 5 and labels is None and classes is None
    assert formats.folder_listing(tmp_path, "none")[0] == files
    with pytest.raises(ValueError, match="both class sub-folders.*data.labels=none"):
        formats.folder_listing(tmp_path, "folders")
    with pytest.raises(ValueError, match="data.labels must be one of auto, folders, none"):
        formats.folder_listing(tmp_path, "yes")
    assert formats.folder_listing(tmp_path / "a")[1] is None  # a/ and a/nested/deeper/


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        (None, "data.root is not set: give the folder of your images"),
        ("nowhere", "no such folder"),
        ("file.txt", "is a file; give the folder that holds your images"),
    ],
    ids=["missing", "does-not-exist", "a-file"],
)
def test_a_missing_or_wrong_data_root_is_one_line(tmp_path, capsys, root, expected):
    (tmp_path / "file.txt").write_text("not a folder")
    given = [] if root is None else [f"data.root={tmp_path / root}"]
    assert main(["train", "simclr/folder", *given, f"train.out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_labelled_folder_without_a_test_fraction_says_how_to_hold_some_out(tmp_path):
    mixed_folder(tmp_path, classes=("a", "b"), per_class=3)
    spec = {"name": "image_folder", "root": str(tmp_path), "size": 16}
    with pytest.raises(FileNotFoundError, match="data.test_fraction is not set"):
        DATASETS.build(spec, split="test")
    held = DATASETS.build({**spec, "test_fraction": 0.3}, split="test")
    assert held.labels.tolist() == [0, 1]  # round(0.3 · 3) = 1 of each class
