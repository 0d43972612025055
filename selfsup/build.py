"""Builds a config's parts: data, views, method. Shared by training and by loading a run.

A method names what it needs from the engine as constructor parameters (`methods.base.SUPPLIED`);
`build_method` passes exactly those, so a method never reads data, files or labels to get them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.config import Config, apply_overrides, load_recipe, recipe_names, resolve
from selfsup.data.datasets import SETTLE, ImageData
from selfsup.data.memory import remember
from selfsup.data.selection import load_split
from selfsup.files import load_weights
from selfsup.methods.base import Method
from selfsup.registry import BACKBONES, METHODS, VIEWS, parameters
from selfsup.target import use_target_setting

# Supplied values taken from another run: parameter -> (the train.* key naming that run, which is
# also the folder of its copy inside a new run; what of that run's method is passed).
FROM_RUNS = {
    "pretrained": ("init", lambda method: method),  # fine-tuning: its encoder (and projector)
    "teacher": ("teacher", lambda method: method),  # distillation
}


def load_data(config: Config, split: str) -> ImageData:
    """A split of the config's dataset, with data.classes and data.fraction applied (the
    fraction's images chosen with train.seed: selfsup/data/selection.py)."""
    return load_split(config.data, split, seed=config.train.seed)


def settle_data(config: Config) -> Config:
    """`config` with what its dataset decides from the data written in (image_folder's and
    array's data.size: auto and data.channels: data/folder.py), so that the new run's
    config.yaml holds numbers and the run replays and evaluates the same way."""
    settle = SETTLE.get(config.data["name"])
    if settle is None:
        return config
    return dataclasses.replace(config, data=settle(dict(config.data)))


OWN_IMAGES = "folder"  # <method>/folder: the recipe of a method for your own images


def in_memory_config(
    recipe: str | Path, overrides: list[str] | None, images: Any, labels: Any
) -> Config:
    """The config that trains `recipe` on images given in memory (data/memory.py): a method name
    (`simclr`) picks its recipe for your own images (simclr/folder), a recipe name or YAML path
    is taken as is; its data section becomes the `array` dataset of these images, with the
    recipe's data.size and data.test_fraction. A folder path as `images` trains on that folder."""
    name = str(recipe)
    if "/" not in name and not Path(name).suffix:
        if f"{name}/{OWN_IMAGES}" not in recipe_names():
            METHODS.get(name)  # an unknown method: did-you-mean
            have = sorted(n.split("/")[0] for n in recipe_names() if n.endswith(f"/{OWN_IMAGES}"))
            raise FileNotFoundError(
                f"method '{name}' has no recipe for your own images ({name}/{OWN_IMAGES}); give "
                f"a full recipe name such as {name}/fashion_mnist (its data section is replaced) "
                f"or one of the methods that have one: {', '.join(have)}"
            )
        name = f"{name}/{OWN_IMAGES}"
    raw = load_recipe(name)
    given = raw.get("data") or {}
    if isinstance(images, (str, Path)):
        if labels is not None:
            raise ValueError(
                "labels= goes with images in memory; a folder's labels are its sub-folders"
            )
        folder = {"name": "image_folder", "size": "auto", "channels": "auto", "test_fraction": 0.2}
        raw["data"] = {
            **folder,
            **(given if given.get("name") == "image_folder" else {}),
            "root": str(images),
        }
        return resolve(apply_overrides(raw, overrides or []))
    spec = remember(images, labels)
    kept = {key: given[key] for key in ("size", "test_fraction") if key in given}
    raw["data"] = {**spec, "size": "auto", "test_fraction": 0.2, **kept}
    return resolve(apply_overrides(raw, overrides or []))


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


def build_method(
    config: Config, info: dict[str, Any], run_dir: Path | None = None, init_weights: bool = False
) -> Method:
    """The method of `config` for data described by `info`, with what it needs supplied.

    A method that takes `pretrained` gets the method of the run `train.init`, one that takes
    `teacher` the method of the run `train.teacher` (FROM_RUNS); with their checkpoint's weights
    only with `init_weights` (a fresh start: later the run's own checkpoint holds them).
    """
    name = config.method["name"]
    wanted = parameters(METHODS.get(name))

    def make_backbone(**changes: Any) -> nn.Module:
        context = {"in_channels": info["channels"], "image_size": info["image_size"], **changes}
        return BACKBONES.build(config.backbone, **context)

    supplied: dict[str, Any] = {"backbone": make_backbone(), "make_backbone": make_backbone}
    if "num_samples" in wanted:
        supplied["num_samples"] = info["train_size"]
    if "num_classes" in wanted:
        if not info.get("num_classes"):
            raise ValueError(
                f"method '{name}' trains on labels, but dataset '{config.data['name']}' has "
                f"none; choose a labelled dataset"
            )
        supplied["num_classes"] = info["num_classes"]
    for parameter, (key, part) in FROM_RUNS.items():
        if parameter in wanted:
            supplied[parameter] = part(_method_of_run(config, info, key, run_dir, init_weights))
        elif getattr(config.train, key) is not None:
            raise ValueError(
                f"train.{key} gives a method its {parameter} from another run, and method "
                f"'{name}' takes none (methods that do: {', '.join(_takers(parameter))})"
            )
    method = METHODS.build(config.method, **supplied)
    # here, not in train(): a loaded run needs it too (config.py checked the method has it)
    use_target_setting(method, config.train.target, config.train.target_momentum)
    return method


def _method_of_run(
    config: Config, info: dict[str, Any], key: str, run_dir: Path | None, weights: bool
) -> Method:
    """The method of the run that train.<key> names. Its architecture comes from the copy in
    run_dir/<key> when there is one (a run stays loadable without the runs it started from);
    its weights from that run's checkpoint only with `weights` (a fresh start)."""
    named = getattr(config.train, key)
    copy = run_dir / key if run_dir is not None else None
    if copy is not None and (copy / "config.yaml").is_file():
        source = copy
    elif named is None:
        raise ValueError(
            f"method '{config.method['name']}' starts from another run: set train.{key}=RUN_DIR"
            + (" (or run `selfsup finetune RUN_DIR`)" if key == "init" else "")
        )
    else:
        source = Path(named)
    source_config, source_info = read_run_files(source)
    if source_info["channels"] != info["channels"]:
        raise ValueError(
            f"train.{key}={named} was trained on {source_info['channels']}-channel images, "
            f"dataset '{config.data['name']}' has {info['channels']}"
        )
    method = build_method(source_config, source_info, source)
    if weights:
        load_weights(method, Path(named) / "checkpoints" / "last.pt")
    return method


def _takers(parameter: str) -> list[str]:
    return [n for n in METHODS.names() if parameter in parameters(METHODS.get(n))]


def read_run_files(path: Path) -> tuple[Config, dict[str, Any]]:
    """The resolved config and data description a run folder was created with."""
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{path} is not a run folder (no config.yaml); runs are created by "
            f"`selfsup train RECIPE`"
        )
    config = resolve(load_recipe(path / "config.yaml"))  # a YAML error names file and line
    data = path / "data.json"
    try:
        return config, json.loads(data.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{data} is missing: the run folder is incomplete (train writes it at the start)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{data}: not valid JSON ({error}); the run folder is damaged") from None


def finetune_config(
    run_dir: str | Path, overrides: list[str] | None = None, recipe: str | None = None
) -> Config:
    """The config that fine-tunes the encoder of `run_dir`: a finetune recipe (default:
    finetune/<the run's dataset>) with the run's backbone, data and image size, train.init=run.
    An override data.name=B fine-tunes on dataset B (transfer) without the run's data options."""
    source, info = read_run_files(Path(run_dir))
    if recipe is None:
        recipe = f"finetune/{source.data['name']}"
        if recipe not in recipe_names():
            raise FileNotFoundError(
                f"no fine-tuning recipe for dataset '{source.data['name']}' ({recipe}); give one "
                f"with --recipe (e.g. finetune/fashion_mnist) and override what differs"
            )
    raw = load_recipe(recipe)
    data_name = apply_overrides({}, overrides or []).get("data", {}).get("name")
    same_data = data_name in (None, source.data["name"])
    raw["backbone"], raw["data"] = source.backbone, source.data if same_data else {}
    raw["views"] = {**raw.get("views", {}), "size": info["image_size"]}
    raw["train"] = {**raw.get("train", {}), "init": str(run_dir)}
    return resolve(apply_overrides(raw, overrides or []))


def copy_run_files(source: Path, destination: Path) -> None:
    """Copy what rebuilds a run's method (config, data description, its own init copy)."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "data.json"):
        shutil.copy2(source / name, destination / name)
    for key, _ in FROM_RUNS.values():
        if (source / key).is_dir():
            copy_run_files(source / key, destination / key)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available; use train.device=cpu")
    return device
