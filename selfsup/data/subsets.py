"""Semi-supervised label fractions: the class-balanced labelled subset a run trains on.

SimCLR (Chen et al. 2020, arXiv 2002.05709, §6 and App. B.5) and SimCLR v2 (arXiv 2006.10029,
§4) fine-tune on 1 % and 10 % of ImageNet's labels, sampled "in a class-balanced way" (about 12.8
and 128 images per class). `train.label_fraction` does the same on any labelled dataset; the
chosen indices are written to <run>/labelled.json when the run is created, and a resumed run
trains on the saved ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from selfsup.data.datasets import ImageData
from selfsup.params import FRACTION, check_limits

LABELLED_FILE = "labelled.json"


def seeded_subset(count: int, size: int, seed: int) -> Tensor:
    """Indices (int64) of `size` of range(count): the first of a permutation seeded by `seed`
    with a generator of its own, so the global RNG is untouched (all count, permuted, if fewer).
    """
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size]


def labelled_subset(labels: Tensor | None, fraction: float, seed: int) -> Tensor:
    """Sorted indices (int64) of a class-balanced subset: class c with n_c examples contributes
    max(round(fraction · n_c), 1) of them (Python's round: halves to even), the first ones of a
    permutation seeded by (seed, c).

    Each class has its own permutation, so a smaller fraction's subset lies inside a larger one's
    (the 1 % images are among the 10 %) and a class's choice does not depend on the others.
    """
    if labels is None:
        raise ValueError(
            "train.label_fraction chooses a subset of the labelled training images, and the "
            "dataset has no labels; choose a labelled dataset or leave train.label_fraction unset"
        )
    check_limits("train", {"label_fraction": fraction}, {"label_fraction": FRACTION})
    labels = labels.cpu()
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().squeeze(1)
        count = max(round(fraction * len(members)), 1)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + label)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


def subset(data: ImageData, indices: Tensor) -> ImageData:
    """The images (and labels) of `data` at `indices`, with the same class names."""
    labels = data.labels[indices] if data.labels is not None else None
    return ImageData(data.images[indices], labels, data.classes)


def save_labelled(run_dir: Path, fraction: float, seed: int, indices: Tensor) -> None:
    """Write <run>/labelled.json: the fraction and seed that chose the subset, and its indices."""
    record = {
        "fraction": fraction,
        "seed": seed,
        "count": len(indices),
        "indices": indices.tolist(),
    }
    (run_dir / LABELLED_FILE).write_text(json.dumps(record))


def labelled_indices(
    labels: Tensor | None, fraction: float | None, seed: int, run_dir: Path | None = None
) -> Tensor | None:
    """The training indices a run with train.label_fraction=`fraction` trains on; None: all.

    A new run (run_dir None) chooses them (`labelled_subset`); the run in `run_dir` (a resume)
    reads its labelled.json, which must agree with `fraction` and `seed`.
    """
    if run_dir is None:
        return None if fraction is None else labelled_subset(labels, fraction, seed)
    path = run_dir / LABELLED_FILE
    if not path.is_file():
        if fraction is None:
            return None
        raise ValueError(
            f"{run_dir} trains on all labels (it has no {LABELLED_FILE}), so it cannot resume "
            f"with train.label_fraction={fraction}; leave train.label_fraction unset"
        )
    saved = json.loads(path.read_text())
    if (fraction, seed) != (saved["fraction"], saved["seed"]):
        raise ValueError(
            f"{run_dir} trains on the labels chosen with train.label_fraction="
            f"{saved['fraction']}, train.seed={saved['seed']} ({path}); resume with those "
            f"values, not train.label_fraction={fraction}, train.seed={seed}"
        )
    indices = torch.tensor(saved["indices"], dtype=torch.long)
    if labels is not None and len(indices) and int(indices.max()) >= len(labels):
        raise ValueError(
            f"{path} names image {int(indices.max())}, and the training split has only "
            f"{len(labels)}: the dataset changed since the run was created"
        )
    return indices
