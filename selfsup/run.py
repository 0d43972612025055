"""The run folder: the only coupling between training and everything after it.

<run>/config.yaml          resolved config (every default written out)
<run>/data.json            input channels/size, normalisation and classes the model was built for
<run>/metrics.jsonl        one JSON object per logged step, kNN monitor and evaluation
<run>/checkpoints/last.pt  method, optimizer, data order and RNG state (atomic, with its SHA-256;
                           previous.pt: the one before, used when last.pt is damaged)
<run>/curves.png           loss and kNN curves
<run>/tensorboard/, mlruns/  the same numbers for TensorBoard and MLflow (train.loggers)
<run>/init/, <run>/teacher/  config.yaml and data.json of the runs train.init / train.teacher
                           named (fine-tuning, distillation): the run rebuilds without them
<run>/labelled.json        train.label_fraction's class-balanced subset (semi-supervised)
<run>/eval.json, stats.json, stages.json, gradients.json   what the evaluations measured (the
                           first three merged under .eval.json.lock etc.: files.merge_json)
<run>/.lock                the process training it (files.hold_folder: no second one resumes it)
"""

from __future__ import annotations

import itertools
import json
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from selfsup.build import FROM_RUNS, build_method, build_views, copy_run_files, read_run_files
from selfsup.config import Config
from selfsup.files import (
    create_exclusive,
    load_checkpoint,
    load_weights,
    make_folder,
    previous_checkpoint,
    read_metrics,
)
from selfsup.methods.base import Method


class Run:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{self.path} is not a run folder (no config.yaml); "
                f"runs are created by `selfsup train RECIPE`"
            )

    @classmethod
    def create(cls, config: Config, info: dict[str, Any]) -> Run:
        """The new run folder of `config`, claimed by writing its config.yaml (create_exclusive):
        of processes started together, each gets its own. An automatic name that another run
        took first gets a suffix (-2, -3, ...); a train.name that exists is an error."""
        name = config.train.name or (
            f"{config.method['name']}-{config.data['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        for number in itertools.count(1):
            path = Path(config.train.out_dir) / (name if number == 1 else f"{name}-{number}")
            make_folder(path, "train.name")  # train.out_dir itself was made when training began
            if create_exclusive(path / "config.yaml", text):
                break
            if config.train.name:
                raise FileExistsError(
                    f"run folder {path} exists; continue it with `selfsup train --resume {path}` "
                    f"or choose another train.name"
                )
        (path / "data.json").write_text(json.dumps(info, indent=1))
        for key, _ in FROM_RUNS.values():  # what rebuilds the runs it starts from
            if getattr(config.train, key) is not None:
                copy_run_files(Path(getattr(config.train, key)), path / key)
        return cls(path)

    @cached_property
    def config(self) -> Config:
        return read_run_files(self.path)[0]

    @cached_property
    def info(self) -> dict[str, Any]:
        return read_run_files(self.path)[1]

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    @property
    def epochs(self) -> float:
        """The epochs it is trained for: train.epochs, or the length a budget's re-plan chose
        (its "replan" event; train.epochs is then the length the schedules were planned over)."""
        event = next((r for r in self.metrics if r.get("event") == "replan"), None)
        return event["epochs"] if event else self.config.train.epochs

    def collapse_event(self) -> dict[str, Any] | None:
        """The "collapse" record of a run the collapse guard stopped, else None."""
        return next((r for r in self.metrics if r.get("event") == "collapse"), None)

    @property
    def has_checkpoint(self) -> bool:
        """Whether a checkpoint was saved (last.pt, or previous.pt when last.pt is lost)."""
        return self.checkpoint_path.is_file() or previous_checkpoint(self.checkpoint_path).is_file()

    def checkpoint(self) -> dict[str, Any]:
        """The last good checkpoint, verified (files.load_checkpoint)."""
        return load_checkpoint(self.checkpoint_path)

    @cached_property
    def method(self) -> Method:
        """The trained method (CPU, eval mode) with the weights of the last checkpoint."""
        method = build_method(self.config, self.info, self.path)
        load_weights(method, self.checkpoint_path)
        return method.eval()

    @property
    def encoder(self) -> Any:
        """The trained method's representation (`Method.encoder`)."""
        return self.method.encoder

    @cached_property
    def views(self) -> Any:
        return build_views(self.config, self.info)

    def __repr__(self) -> str:
        return f"Run('{self.path}')"


def load(run_dir: str | Path) -> Run:
    """Open a run folder: `.config`, `.method`, `.encoder`, `.metrics`, `.views`."""
    return Run(run_dir)


def write_config(path: str | Path, config: Config) -> None:
    """Replace the config.yaml of run folder `path` (a resume's settings, a budget's re-plan) in
    one step: a reader sees the old file or the new one, never a part."""
    target = Path(path) / "config.yaml"
    temporary = target.with_name(".config.yaml.tmp")
    temporary.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    os.replace(temporary, target)
