"""A run's encoder evaluated (kNN, linear probe), the raw-pixel baselines and embedding
(export: eval/export.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.augment import ops
from selfsup.build import load_data, pick_device
from selfsup.config import Config
from selfsup.data.datasets import ImageData
from selfsup.data.selection import describe, load_split
from selfsup.engine.loggers import append
from selfsup.files import merge_json
from selfsup.probes.features import extract, pixel_features
from selfsup.probes.knn import accuracy, knn
from selfsup.probes.linear import linear_probe
from selfsup.registry import DATASETS
from selfsup.run import Run

logger = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear")  # of any run's frozen encoder
CLASSIFY = "classify"  # a classifier run's own predictions (supervised, finetune, distill)


def probes_skipped(run: Run) -> str | None:
    """Why the kNN and linear probes of a run's own data cannot run (its images have no labels,
    or one class only), or None. From data.json: no image is read."""
    classes = run.info.get("num_classes")
    if classes is None:
        return (
            f"{run.path} was trained on images without labels; to probe, put the images of each "
            f"class in a sub-folder of data.root (data.labels=auto), give labels= with images in "
            f"memory, or probe another dataset with --data"
        )
    if classes < 2:
        return f"{run.path} was trained on one class of images: a probe has nothing to tell apart"
    return None


def _check(protocols: list[str]) -> None:
    for name in protocols:
        if name not in (*PROTOCOLS, CLASSIFY):
            valid = ", ".join((*PROTOCOLS, CLASSIFY))
            raise ValueError(f"unknown evaluation '{name}'; valid: {valid}")


def _splits(config: Config) -> tuple[ImageData, ImageData]:
    train, test = load_data(config, "train"), load_data(config, config.eval.test_split)
    _check_labels(config.data["name"], train, test, config.eval.test_split)
    return train, test


def _check_labels(name: str, train: ImageData, test: ImageData, test_split: str) -> None:
    if train.labels is None or test.labels is None:
        raise ValueError(
            f"dataset '{name}' has no labels; kNN and linear evaluation need a labelled train "
            f"and {test_split} split"
        )


def _transfer_splits(run: Run, data: dict[str, Any]) -> tuple[ImageData, ImageData]:
    """Train and test split of dataset B (`data`: a data spec), checked against the run's input."""
    train, test = load_split(data, "train"), load_split(data, "test")
    _check_labels(data["name"], train, test, "test")
    channels = run.info["channels"]
    if train.shape[0] != channels:
        raise ValueError(
            f"{run.path} was trained on {channels}-channel images, dataset '{data['name']}' has "
            f"{train.shape[0]}-channel images; transfer to a dataset with {channels} channels"
        )
    return train, test


def probe(
    config: Config,
    protocols: list[str],
    train_f: torch.Tensor,
    train: ImageData,
    test_f: torch.Tensor,
    test: ImageData,
    center: bool | None = None,
) -> dict[str, float]:
    """The kNN and/or linear probe (`protocols`) trained on (train_f, train's labels) and scored
    on (test_f, test's labels), with the run's eval settings: top-1/top-5 in %. `center`: the
    kNN's mean-centring, eval.knn_center when None."""
    results: dict[str, float] = {}
    if "knn" in protocols:
        out = knn(
            train_f,
            train.labels,
            test_f,
            test.labels,
            k=config.eval.knn_k,
            temperature=config.eval.knn_temperature,
            num_classes=train.num_classes,
            center=config.eval.knn_center if center is None else center,
        )
        results.update(knn_top1=out["top1"], knn_top5=out["top5"])
    if "linear" in protocols:
        out = linear_probe(
            train_f,
            train.labels,
            test_f,
            test.labels,
            epochs=config.eval.linear_epochs,
            weight_decay=config.eval.linear_weight_decay,
            val_fraction=config.eval.linear_val_fraction,
            seed=config.train.seed,
        )
        results.update(linear_top1=out["top1"], linear_top5=out["top5"])
        if "weight_decay" in out:
            results["linear_weight_decay"] = out["weight_decay"]
    return results


def _resized_first(
    transform: Callable[[torch.Tensor], torch.Tensor], size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`transform` of images whose centre square is first resized to (size, size): the eval
    transform's own resize (to the run's image size) is then the identity."""
    return lambda images: transform(ops.resize(images, size))


def probe_data(
    run: Run, data: str | dict[str, Any] | None = None, config: Config | None = None
) -> tuple[str, ImageData, ImageData, Callable[[torch.Tensor], torch.Tensor]]:
    """(dataset name, train split, test split, transform) that the probes of `run` use: its own
    dataset's labelled splits and its eval transform, or with `data` (a dataset name or spec)
    dataset B's, resized to the run's image size first (transfer). A spec with data.classes or
    data.fraction is named with them (selfsup/data/selection.py `describe`). `config`: the run's
    with evaluation overrides (`with_eval_overrides`), which pick the test split."""
    transform, config = run.views.eval_transform, config or run.config
    if data is None:
        return config.data["name"], *_splits(config), transform
    spec = {"name": data} if isinstance(data, str) else dict(data)
    train, test = _transfer_splits(run, spec)
    return describe(spec), train, test, _resized_first(transform, run.info["image_size"])


def stored_results(run: Run) -> dict[str, float]:
    """Every result merged into <run>/eval.json so far ({} before the first evaluation)."""
    path = run.path / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def with_eval_overrides(run: Run, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The run's config with `overrides` of its eval.* settings (eval.knn_k=20,
    eval.test_split=train, ...); any other section is refused: the encoder was trained with it."""
    others = sorted({o.split("=", 1)[0] for o in overrides if not o.startswith("eval.")})
    if others:
        raise ValueError(
            f"an evaluation takes eval.* overrides only (eval.knn_k, eval.knn_temperature, "
            f"eval.linear_weight_decay, eval.test_split, ...), not {', '.join(others)}; "
            f"to probe another dataset use --data"
        )
    return run.config.replace(list(overrides)) if overrides else run.config


def evaluate(
    run_dir: str | Path | Run,
    protocols: list[str] | tuple[str, ...] = PROTOCOLS,
    device: str = "auto",
    data: str | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, float]:
    """kNN and/or linear probe of a run's frozen encoder on its dataset's train/test splits, and
    for a classifier run (`classify`) the test accuracy of its own predictions.

    With `data` (a dataset name, or a spec {"name": ..., **options} such as a root), transfer:
    the encoder pre-trained on the run's dataset A is probed on dataset B's train and test
    splits (Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?"; SimCLR §6,
    transfer learning). B's images must have the run's channels; they are resized (centre square,
    bilinear) to the run's image size and normalised with the run's own mean and std of A, the
    input statistics the encoder was trained with. Their keys name B ("digits/linear_top1"), so
    they sit beside the run's own results instead of replacing them.

    `overrides` change the run's eval.* settings for this evaluation (`with_eval_overrides`).
    Results are appended to the run's metrics.jsonl (event "eval", with "data": the dataset, and
    the overrides) and merged into <run>/eval.json. A run whose images have no labels skips the
    probes of its own data with a warning saying so (`probes_skipped`) and returns {}.
    """
    protocols = list(protocols)
    _check(protocols)
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    config = with_eval_overrides(run, overrides)
    batch_size = config.eval.batch_size
    if data is not None and CLASSIFY in protocols:
        raise ValueError(
            f"'classify' scores the run's own classes and has no meaning on another dataset "
            f"({data}); transfer with knn or linear"
        )
    skipped = probes_skipped(run) if data is None and set(protocols) & set(PROTOCOLS) else None
    if skipped is not None:
        logger.warning(f"selfsup: kNN and linear probes skipped: {skipped}")
        protocols = [p for p in protocols if p not in PROTOCOLS]
        if not protocols:
            return {}
    name, train, test, transform = probe_data(run, data, config)
    prefix = "" if data is None else f"{name}/"
    target = pick_device(device)
    results: dict[str, float] = {}
    if CLASSIFY in protocols:
        if not hasattr(run.method, "classify"):
            raise ValueError(
                f"{run.path} trained method '{config.method['name']}', which has no classifier; "
                f"'classify' is for supervised, finetune and distill runs (use knn or linear)"
            )
        method = run.method.to(target)
        logits = extract(method.classify, test.images, transform, batch_size, target)
        out = accuracy(logits, test.labels)
        results.update(classify_top1=out["top1"], classify_top5=out["top5"])
    if set(protocols) & set(PROTOCOLS):
        encoder = run.encoder.to(target)
        train_f = extract(encoder, train.images, transform, batch_size)
        test_f = extract(encoder, test.images, transform, batch_size)
        results.update(probe(config, protocols, train_f, train, test_f, test))
    results = {f"{prefix}{key}": value for key, value in results.items()}
    step = run.checkpoint()["step"]
    given = {"overrides": list(overrides)} if overrides else {}
    append(run, {"event": "eval", "data": name, "step": step, **given, **results})
    merge_json(run.path / "eval.json", lambda stored: stored.update(results))
    return results


def pixel_baselines(
    config: Config, protocols: list[str] | tuple[str, ...] = PROTOCOLS
) -> dict[str, float]:
    """The same kNN / linear protocols on raw pixels (kNN on mean-centred pixels)."""
    train, test = _splits(config)
    return probe(
        config,
        list(protocols),
        pixel_features(train.images),
        train,
        pixel_features(test.images),
        test,
        center=True,
    )


def embed(
    run_dir: str | Path | Run,
    images: str,
    output: str | Path | None = None,
    device: str = "auto",
) -> np.ndarray:
    """Encoder features of a folder of images or a dataset (`name` or `name:split`).

    Writes a float32 (N, D) .npy file to `output` (that very path) when given; returns the array.
    """
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    info = run.info
    if Path(images).is_dir():
        data = DATASETS.build(
            {"name": "image_folder", "root": images},
            size=info["image_size"],
            channels=info["channels"],
        )
    else:
        name, _, split = images.partition(":")
        if name not in DATASETS and ("/" in images or Path(images).suffix):
            raise FileNotFoundError(
                f"{images} is not a folder of images (no such folder) nor a dataset name such as "
                f"fashion_mnist:test"
            )
        if name not in DATASETS:
            DATASETS.get(name)  # raises: unknown dataset, with the valid names
        data = DATASETS.build({"name": name}, split=split or "train")
    if data.shape[0] != info["channels"]:
        raise ValueError(
            f"the run was trained on {info['channels']}-channel images, {images} has "
            f"{data.shape[0]}"
        )
    encoder = run.encoder.to(pick_device(device))
    features = extract(encoder, data.images, run.views.eval_transform, run.config.eval.batch_size)
    array = features.numpy().astype(np.float32)
    if output is not None:
        with open(output, "wb") as f:  # np.save of a path would add .npy to a name without it
            np.save(f, array)
    return array


def summary(run: Run) -> dict[str, Any]:
    """Last logged loss, kNN and evaluation results of a run."""
    out: dict[str, Any] = {}
    for record in run.metrics:
        for key in ("loss", "knn_top1", "linear_top1", "step"):
            if key in record:
                out[key] = record[key]
    return out
