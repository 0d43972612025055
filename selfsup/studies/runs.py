"""The bookkeeping of studies that train runs into one folder (compare, the semantic-gap and
momentum-encoder experiments): the folder is held by one study at a time; a run is reused when
finished, resumed when interrupted, refused when trained with other settings; its kNN and linear
results are read where stored."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selfsup.config import Config
from selfsup.engine.budget import scale_schedules
from selfsup.engine.collapse import CollapseError
from selfsup.engine.train import FIXED_ON_RESUME, train
from selfsup.eval.protocols import evaluate, stored_results
from selfsup.files import hold_folder, make_folder
from selfsup.run import Run

logger = logging.getLogger(__name__)

ACCURACIES = ("knn_top1", "linear_top1")
# The sections of a reused run that must match the recipe as it resolves now: those a resume keeps.
FIXED = FIXED_ON_RESUME
# ... and the train.* keys that change what is trained (the target branch: arXiv 2112.05141 Table 2)
FIXED_TRAIN = ("target", "target_momentum")


@contextmanager
def study_folder(out: str | Path) -> Iterator[Path]:
    """The study's `out` folder, made and held (files.hold_folder) until the block ends: a
    second study pointed at it stops with one line naming the first."""
    out = make_folder(out, "--out")
    with hold_folder(out, "--out folder", ", or choose another --out"):
        yield out


def probed(run: Run, device: str = "auto") -> dict[str, Any]:
    """kNN and linear top-1 of a run's encoder: read from <run>/eval.json where measured."""
    results = stored_results(run)
    return results if set(ACCURACIES) <= set(results) else evaluate(run, device=device)


def slug(recipe: str) -> str:
    """A folder-name form of a recipe name or YAML path."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe.replace("/", "_")


def trained(wanted: Config, path: Path, minutes: float | None) -> Run:
    """The run of `wanted` in `path`: reused when finished (or collapsed), resumed when
    interrupted, else trained; a folder trained with other settings is refused."""
    try:
        if (path / "config.yaml").is_file():
            run = Run(path)
            check_reusable(run, wanted, minutes)
            if not finished(run) and not run.collapse_event():
                logger.info(f"  resuming {path}")
                run = train(resume=path)
            return run
        return train(wanted.replace([f"train.out_dir={path.parent}", f"train.name={path.name}"]))
    except CollapseError:
        return Run(path)  # its metrics end with the "collapse" event


def length_overrides(epochs: float | None, minutes: float | None) -> list[str]:
    """The overrides that set every run's length: `epochs`, a budget of `minutes`, or (neither)
    the recipes' own epochs; checked as --epochs / --minutes."""
    if epochs is not None and minutes is not None:
        raise ValueError("give --epochs or --minutes, not both")
    for option, value in (("--epochs", epochs), ("--minutes", minutes)):
        if value is not None and not value > 0:
            raise ValueError(f"{option} must be > 0, got {value}")
    if epochs is not None:
        return [f"train.epochs={epochs}"]
    return [f"train.budget_minutes={minutes}"] if minutes is not None else []


def describe_length(epochs: float | None, minutes: float | None) -> str:
    """How `length_overrides` set the runs, for a table's caption."""
    if epochs is not None:
        return f"train.epochs={epochs:g}"
    return f"train.budget_minutes={minutes:g}" if minutes is not None else "the recipes' own epochs"


def check_reusable(run: Run, wanted: Config, minutes: float | None) -> None:
    """Raise unless `run` was trained as `wanted` would be. A budget's epochs are measured and
    written to the run's config with its schedules in epochs scaled to them, the budget and the
    scale are in its "budget" event; without a budget the epochs must be equal."""
    event = next((r for r in run.metrics if r.get("event") == "budget"), None)
    budget = event["budget_minutes"] if event else None
    if event:  # runs from before schedules were scaled have no scale: theirs are the recipe's
        wanted = scale_schedules(wanted, event.get("scale", 1.0))[0]
    different = [s for s in FIXED if getattr(run.config, s) != getattr(wanted, s)]
    different += [
        f"train.{key}"
        for key in ("seed", "max_steps", *FIXED_TRAIN)
        if getattr(run.config.train, key) != getattr(wanted.train, key)
    ]
    if budget != minutes:
        different.append("train.budget_minutes")
    elif minutes is None and run.config.train.epochs != wanted.train.epochs:
        different.append("train.epochs")
    elif event and event.get("nominal_epochs", wanted.train.epochs) != wanted.train.epochs:
        different.append("train.epochs")  # the length the budget's schedules were scaled from
    if different:
        raise ValueError(
            f"{run.path} was trained with other settings ({', '.join(different)}); write into "
            f"another --out, or delete that folder to train it again"
        )


def finished(run: Run) -> bool:
    return any(r.get("event") == "end" for r in run.metrics)


def collapsed_row(run: Run, keys: Sequence[str]) -> dict[str, Any] | None:
    """A study's row for a run the collapse guard stopped (its `keys` NaN, the step it stopped
    at, the time it trained), with a warning; None for a healthy run."""
    collapse = run.collapse_event()
    if collapse is None:
        return None
    logger.warning(f"  collapsed: {collapse['message']}")
    return {
        "run": str(run.path),
        "collapsed_at_step": collapse["step"],
        "train_seconds": collapse.get("seconds", math.nan),
        **dict.fromkeys(keys, math.nan),
    }
