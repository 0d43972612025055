"""Nearest-neighbour retrieval with a run's encoder: `selfsup neighbours RUN IMAGE [IMAGE ...]`.

Each query image is decoded as the run's training images were (its channels and image size from
data.json), embedded by the trained encoder, and compared by cosine similarity
cos(q, g) = q·g / (‖q‖ ‖g‖) of the features (the similarity the kNN probe votes with) with every
image of a gallery: by default the run's own training images, else another folder or a dataset.
The result names each neighbour by its file where the gallery has files (an image folder), else
by its index in the gallery; a query found in the gallery is not its own neighbour. `output`
writes it as JSON, or as a contact sheet PNG: one row per query, its neighbours beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.build import load_data, pick_device
from selfsup.data import formats
from selfsup.data.datasets import ImageData
from selfsup.data.memory import resize
from selfsup.plot import save
from selfsup.probes.features import extract
from selfsup.registry import DATASETS
from selfsup.run import Run

OUTPUTS = (".png", ".json")
TILE_INCHES = 1.3  # one image of the contact sheet


def read_queries(images: str | Path | list[str | Path], channels: int, size: int) -> ImageData:
    """Image files and folders (every image below them) decoded as the run's training images:
    `channels` 1 (L) or 3 (RGB), the centre square at `size` px; `files` names each."""
    given = [images] if isinstance(images, (str, Path)) else list(images)
    if not given:
        raise ValueError("neighbours needs at least one query image (a file or a folder)")
    mode = "L" if channels == 1 else "RGB"
    arrays, names = [], []
    for item in map(Path, given):
        if item.is_dir():
            files, _, _ = formats.folder_listing(item, "none")
            decoded, readable = formats.read_images(files, item, mode, size)
            arrays.append(decoded)
            names += [str(f) for f, ok in zip(files, readable, strict=True) if ok]
        elif item.is_file():
            try:
                arrays.append(formats.load_image(item, mode, size)[None])
            except formats.UNREADABLE as error:
                raise ValueError(f"cannot read the image {item} ({error})") from None
            names.append(str(item))
        else:
            raise FileNotFoundError(f"query image {item}: no such file or folder")
    return ImageData(torch.from_numpy(np.concatenate(arrays)), files=names)


def read_gallery(run: Run, gallery: str | Path | None) -> tuple[ImageData, str]:
    """(the images searched, their description): the run's training split (None), a folder of
    images, or a dataset `name` / `name:split`, at the run's channels and image size."""
    info = run.info
    channels, size = info["channels"], info["image_size"]
    if gallery is None:
        return load_data(run.config, "train"), f"the training split of {run.path}"
    if Path(gallery).is_dir():
        data = DATASETS.build(
            {"name": "image_folder", "root": str(gallery), "labels": "none"},
            size=size,
            channels=channels,
        )
        return data, f"the folder {gallery}"
    name, _, split = str(gallery).partition(":")
    if name not in DATASETS:
        if "/" in str(gallery) or Path(gallery).suffix:
            raise FileNotFoundError(
                f"--gallery {gallery}: no such folder, nor a dataset name such as digits:test"
            )
        DATASETS.get(name)  # unknown dataset: the valid names
    data = DATASETS.build({"name": name}, split=split or "train")
    if data.shape[0] != channels:
        raise ValueError(
            f"the run was trained on {channels}-channel images, --gallery {gallery} has "
            f"{data.shape[0]}"
        )
    data.images = resize(data.images, size)
    return data, f"dataset {name} ({split or 'train'} split)"


def neighbours(
    run_dir: str | Path | Run,
    images: str | Path | list[str | Path],
    gallery: str | Path | None = None,
    k: int = 5,
    output: str | Path | None = None,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """The `k` nearest gallery images of each query image by cosine similarity of the run's
    encoder features, most similar first: [{"query": file, "neighbours": [{"index": i in the
    gallery, "file": its file or None, "similarity": cos}, ...]}, ...].

    `images`: image files or folders. `gallery`: None (the run's training images), a folder or
    a dataset name[:split]. `output`: a .json file of the result, or a .png contact sheet.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"-k must be a whole number >= 1, got {k!r}")
    if output is not None and Path(output).suffix.lower() not in OUTPUTS:
        raise ValueError(f"-o takes a .png (contact sheet) or .json file, not '{output}'")
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    queries = read_queries(images, run.info["channels"], run.info["image_size"])
    found, described = read_gallery(run, gallery)
    same = _same_files(queries.files, found)
    if k > len(found) - int(same.any()):  # a query in the gallery leaves one image fewer
        raise ValueError(f"-k {k} is more than the {len(found)} images of {described}; lower -k")
    encoder = run.encoder.to(pick_device(device))

    def features(data: ImageData) -> Tensor:
        return extract(encoder, data.images, run.views.eval_transform, run.config.eval.batch_size)

    similarity = F.normalize(features(queries), dim=1) @ F.normalize(features(found), dim=1).T
    best = similarity.masked_fill(same, float("-inf")).topk(k, dim=1)
    result = [
        {
            "query": query,
            "neighbours": [
                {
                    "index": index,
                    "file": found.files[index] if found.files is not None else None,
                    "similarity": round(value, 6),
                }
                for index, value in zip(indices, values, strict=True)
            ],
        }
        for query, indices, values in zip(
            queries.files, best.indices.tolist(), best.values.tolist(), strict=True
        )
    ]
    if output is not None:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            record = {"run": str(run.path), "gallery": described, "k": k, "queries": result}
            path.write_text(json.dumps(record, indent=1))
        else:
            save(contact_sheet(queries, found, best.indices, best.values), path)
    return result


def _same_files(queries: list[str], gallery: ImageData) -> Tensor:
    """(Q, G) bool: query q is gallery image g (the same file), so never its own neighbour."""
    same = torch.zeros(len(queries), len(gallery), dtype=torch.bool)
    if gallery.files is None:  # images in memory or a dataset: no query is one of them
        return same
    where = {str(Path(f).resolve()): i for i, f in enumerate(gallery.files)}
    for row, query in enumerate(queries):
        index = where.get(str(Path(query).resolve()))
        if index is not None:
            same[row, index] = True
    return same


def contact_sheet(queries: ImageData, gallery: ImageData, indices: Tensor, values: Tensor) -> Any:
    """A matplotlib Figure: one row per query (its file name above it), then its neighbours
    nearest first, each titled with its cosine similarity and file name (or gallery index)."""
    from matplotlib.figure import Figure

    rows, k = indices.shape
    figure = Figure(
        figsize=(TILE_INCHES * (k + 1), TILE_INCHES * 1.25 * rows), layout="constrained"
    )
    axes = figure.subplots(rows, k + 1, squeeze=False)
    for row in range(rows):
        cells = [(queries, row, f"query\n{_short(queries.files, row)}")]
        cells += [
            (gallery, int(i), f"{float(v):.3f}\n{_short(gallery.files, int(i))}")
            for i, v in zip(indices[row], values[row], strict=True)
        ]
        for ax, (data, index, title) in zip(axes[row], cells, strict=True):
            image = data.images[index].permute(1, 2, 0).numpy()
            grey = image.shape[2] == 1
            ax.imshow(image[..., 0] if grey else image, cmap="gray" if grey else None, vmin=0,
                      vmax=255, interpolation="nearest")  # fmt: skip
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    return figure


def _short(files: list[str] | None, index: int) -> str:
    """A file's name (its last two path parts: a class folder shows), or '#index'."""
    if files is None:
        return f"#{index}"
    return "/".join(Path(files[index]).parts[-2:])


def format_result(result: list[dict[str, Any]]) -> str:
    """The result as lines: each query, then its neighbours with their similarities."""
    lines = []
    for entry in result:
        lines.append(f"query {entry['query']}")
        for rank, found in enumerate(entry["neighbours"], start=1):
            name = found["file"] if found["file"] is not None else f"#{found['index']}"
            lines.append(f"  {rank:2d}  {found['similarity']:.4f}  {name}")
    return "\n".join(lines)
