"""Feature statistics of a run's frozen encoder on one split of its dataset (probes/statistics.py
gives the formulas): spread and effective rank, alignment and uniformity, within-class variation,
and the distance between the features of chosen classes ("pre-D") and of the rest ("eval-D")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfsup.build import load_data, pick_device
from selfsup.data.datasets import ImageData
from selfsup.engine.loggers import append
from selfsup.files import merge_json
from selfsup.probes.features import extract
from selfsup.probes.statistics import (
    alignment,
    effective_rank,
    intra_class_variation,
    mean_cosine_distance,
    mmd,
    normalized_std,
    uniformity,
)
from selfsup.run import Run


def _check_classes(classes: list[int], data: ImageData, where: str) -> None:
    if data.labels is None:
        raise ValueError(f"the {where} has no labels to pick classes={classes} by; omit them")
    num_classes = data.num_classes
    outside = [c for c in classes if not 0 <= c < num_classes]
    if outside:
        raise ValueError(
            f"class ids {outside} are outside the {where}'s classes 0..{num_classes - 1}; "
            f"give ids in that range"
        )
    if not classes:
        raise ValueError("classes is empty: give the class ids of the pre-training set (pre-D)")
    if len(set(classes)) == num_classes:
        raise ValueError(
            f"the classes given are all {num_classes} classes of the {where}, which leaves "
            f"none to compare with (eval-D); give a strict subset"
        )


@torch.no_grad()
def _augmented_pairs(
    encoder: Any, images: Tensor, views: Any, batch_size: int, device: torch.device, seed: int
) -> tuple[Tensor, Tensor]:
    """Encoder features (eval mode) of two training views of every image: the first two large
    views of the run's augmentation, or two draws of its only one (crop_flip, cmc). The views'
    random parameters come from one seeded CPU generator, the same on every device."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        large, _ = views(batch, generator)
        if len(large) == 1:
            large += views(batch, generator)[0]
        first.append(encoder(large[0]).flatten(1).float().cpu())
        second.append(encoder(large[1]).flatten(1).float().cpu())
    return torch.cat(first), torch.cat(second)


def feature_statistics(
    run_dir: str | Path | Run,
    split: str = "test",
    classes: list[int] | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """Statistics of a run's frozen encoder features (evaluation transform, eval mode) of one
    split of its dataset:

    effective_rank, normalized_std   spread of the L2-normalised features (collapse: ~1, ~0)
    uniformity                       log E exp(-2 ||z_i - z_j||^2), lower = more uniform
    alignment                        E ||z - z+||^2 of two training views of each image (seeded
                                     by train.seed), lower = more invariant
    intra_class_variation            mean squared distance to the class mean (labelled splits),
    intra_class_relative             and that over the spread of the class means

    With `classes` (class ids: the pre-training distribution, "pre-D"), the distance between the
    features of those classes and of all the others (the evaluation distribution, "eval-D"):
    mean_cosine_distance (1 - cos of the two means) and mmd (squared Gaussian-kernel MMD, median
    bandwidth). Results are appended to metrics.jsonl (event "stats") and merged into
    <run>/stats.json under the split's name, with the classes used.
    """
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    config = run.config
    data = load_data(config, split)
    where = f"{config.data['name']} {split} split"
    if classes is not None:
        _check_classes(list(classes), data, where)
        pre = torch.isin(data.labels, torch.tensor(list(classes)))
        if pre.all() or not pre.any():
            raise ValueError(
                f"the {where} has images of {'only' if pre.all() else 'none of'} classes "
                f"{classes}: nothing to compare; choose classes present in it, and not all"
            )
    target = pick_device(device)
    encoder = run.encoder.to(target).eval()
    batch_size, seed = config.eval.batch_size, config.train.seed
    features = extract(encoder, data.images, run.views.eval_transform, batch_size)
    first, second = _augmented_pairs(encoder, data.images, run.views, batch_size, target, seed)
    results = {
        "effective_rank": effective_rank(features),
        "normalized_std": normalized_std(features),
        "uniformity": uniformity(features),
        "alignment": alignment(first, second),
    }
    if data.labels is not None:
        results["intra_class_variation"] = intra_class_variation(features, data.labels)
        if data.labels.unique().numel() > 1:
            results["intra_class_relative"] = intra_class_variation(
                features, data.labels, relative=True
            )
    stored: dict[str, Any] = dict(results)
    if classes is not None:
        results["mean_cosine_distance"] = mean_cosine_distance(features[pre], features[~pre])
        results["mmd"] = mmd(features[pre], features[~pre], seed=seed)
        stored = {**results, "classes": sorted(set(classes))}
    step = run.checkpoint()["step"]
    append(run, {"event": "stats", "split": split, "step": step, **stored})
    merge_json(run.path / "stats.json", lambda merged: merged.setdefault(split, {}).update(stored))
    return results
