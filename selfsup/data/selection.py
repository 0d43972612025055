"""Data keys every dataset takes: `classes` (some of its classes, relabelled 0..k-1) and
`fraction` (a class-balanced, seeded fraction of its training images).

A recipe with `data: {name: fashion_mnist, classes: [0, 1, 2, 3, 4], fraction: 0.1}` trains on
10 % of the training images of classes 0-4, and its kNN monitor and evaluations see those five
classes only: the pre-training set "pre-D" of the semantic-gap study (selfsup/studies/gap.py). The
registry builds the dataset from its own keys; `load_split` then applies these two: `classes` to
every split, `fraction` to the training split only (a test split stays whole).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from selfsup.data.datasets import ImageData
from selfsup.data.subsets import labelled_subset, subset
from selfsup.params import FRACTION, check_limits
from selfsup.registry import DATASETS

SELECTION_KEYS = ("classes", "fraction")


def check_selection(spec: dict[str, Any]) -> dict[str, Any]:
    """The data spec with `classes` as a list of distinct class ids and `fraction` as a float in
    (0, 1]; anything else is an error naming the key and the expected form."""
    spec = dict(spec)
    if "classes" in spec:
        classes = spec["classes"]
        if not isinstance(classes, (list, tuple)) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes
        ):
            raise ValueError(
                f"'data.classes' takes a list of class ids such as [0, 1, 2], got {classes!r}"
            )
        if not classes:
            raise ValueError("'data.classes' is empty: give the class ids to keep, or omit it")
        if len(set(classes)) < len(classes):
            raise ValueError(f"'data.classes' names a class twice: {list(classes)}")
        spec["classes"] = list(classes)
    if "fraction" in spec:
        fraction = spec["fraction"]
        if isinstance(fraction, str):  # YAML 1.1 reads 1e-1 (no dot) as a string
            with contextlib.suppress(ValueError):
                fraction = float(fraction)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"'data.fraction' expects a number in (0, 1], got {fraction!r}")
        check_limits("data", {"fraction": fraction}, {"fraction": FRACTION})
        spec["fraction"] = float(fraction)
    return spec


def select_classes(data: ImageData, classes: Sequence[int], where: str) -> ImageData:
    """The images of `classes` only, class classes[i] relabelled i (the order of the list), with
    the names of those classes. `where` names the split in errors."""
    if data.labels is None:
        raise ValueError(
            f"data.classes keeps some classes, and the {where} has no labels; choose a labelled "
            f"dataset or omit data.classes"
        )
    num_classes = data.num_classes
    outside = [c for c in classes if c >= num_classes]
    if outside:
        raise ValueError(
            f"data.classes names class ids {outside}, and the {where} has classes "
            f"0..{num_classes - 1}; give ids in that range"
        )
    ids = torch.tensor(list(classes))
    new_label = torch.full((num_classes,), -1, dtype=torch.long)
    new_label[ids] = torch.arange(len(ids))
    keep = torch.isin(data.labels, ids).nonzero().squeeze(1)
    names = [data.classes[c] for c in classes] if data.classes is not None else None
    return ImageData(data.images[keep], new_label[data.labels[keep]], names)


def load_split(spec: dict[str, Any], split: str, seed: int = 0) -> ImageData:
    """Split `split` of the dataset `spec` names, restricted to its `classes`; the training
    split also to a class-balanced `fraction` of its images: max(round(fraction · n_c), 1) of
    class c's n_c, chosen with `seed` (selfsup/data/subsets.py `labelled_subset`: a smaller
    fraction's images lie inside a larger one's)."""
    spec = check_selection(spec)
    own = {key: value for key, value in spec.items() if key not in SELECTION_KEYS}
    data = DATASETS.build(own, split=split)
    where = f"dataset '{spec['name']}' {split} split"
    if "classes" in spec:
        data = select_classes(data, spec["classes"], where)
    if "fraction" in spec and split == "train":
        if data.labels is None:
            raise ValueError(
                f"data.fraction keeps a class-balanced fraction of the training images, and the "
                f"{where} has no labels; choose a labelled dataset or omit data.fraction"
            )
        data = subset(data, labelled_subset(data.labels, spec["fraction"], seed))
    return data


def describe(spec: dict[str, Any]) -> str:
    """A short name of the data a spec selects: 'fashion_mnist', or with its selection keys
    'fashion_mnist[classes=5,6,7,8,9]' (the key prefix of evaluations on it)."""
    parts = []
    if "classes" in spec:
        parts.append("classes=" + ",".join(map(str, spec["classes"])))
    if "fraction" in spec:
        parts.append(f"fraction={spec['fraction']:g}")
    return spec["name"] + (f"[{';'.join(parts)}]" if parts else "")


def parse_classes(text: str, option: str = "--classes") -> list[int]:
    """'0,1,2' -> [0, 1, 2] (a command-line option's value); anything else is an error that
    names the option and shows the expected form."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"{option} takes comma-separated class ids such as 0,1,2,3,4, not '{text}'"
        ) from None
