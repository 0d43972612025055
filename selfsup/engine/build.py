"""Builds a config's parts: data, views, method. Shared by training and by loading a run."""

from __future__ import annotations

from typing import Any

import torch

from selfsup.config import Config
from selfsup.data.datasets import ImageData
from selfsup.methods.base import Method
from selfsup.registry import BACKBONES, DATASETS, METHODS, VIEWS
from selfsup.target import use_stop_gradient_targets


def load_data(config: Config, split: str) -> ImageData:
    return DATASETS.build(config.data, split=split)


def data_info(data: ImageData, views: Any) -> dict[str, Any]:
    """What a trained model depends on: input channels and size, normalisation, classes."""
    mean, std = data.mean_std()
    return {
        "channels": data.shape[0],
        "image_size": views.size or data.shape[-1],
        "mean": [round(v, 6) for v in mean],
        "std": [round(max(v, 1e-3), 6) for v in std],
        "num_classes": data.num_classes,
        "classes": data.classes,
        "train_size": len(data),
    }


def build_views(config: Config, info: dict[str, Any] | None = None) -> Any:
    views = VIEWS.build(config.views)
    if info is not None:
        views.set_stats(info["mean"], info["std"])
    return views


def build_method(config: Config, info: dict[str, Any]) -> Method:
    backbone = BACKBONES.build(
        config.backbone, in_channels=info["channels"], image_size=info["image_size"]
    )
    method = METHODS.build(config.method, backbone=backbone)
    if config.train.target not in ("method", "stop_gradient"):
        raise ValueError(
            f"train.target must be 'method' or 'stop_gradient', not '{config.train.target}'"
        )
    if config.train.target == "stop_gradient":
        use_stop_gradient_targets(method)  # here, not in train(): a loaded run needs it too
    return method


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available; use train.device=cpu")
    return device
