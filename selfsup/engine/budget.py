"""A training length from a time budget (train.budget_minutes): measure, then choose the epochs,
and stretch every schedule given in epochs to that length (`scale_schedules`)."""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import asdict, replace
from typing import Any

import selfsup.dist as dist
from selfsup.config import SECTIONS, Config
from selfsup.data.datasets import ImageData
from selfsup.engine.monitor import KnnMonitor
from selfsup.engine.parts import Parts
from selfsup.registry import parameters

log = logging.getLogger(__name__)


def fit_budget(
    config: Config, data: ImageData, steps: int = 8, warmup: int = 2
) -> tuple[Config, dict[str, Any]]:
    """train.epochs that fill train.budget_minutes on this machine, written into the config with
    every schedule in epochs scaled to them (`scale_schedules`); also returns what was measured
    and the scale (logged as the run's "budget" event).

    Throughput is measured on `steps` steps of a throwaway copy of the run's parts (after
    `warmup`), and one kNN monitor pass is timed, so the run itself is exactly the one that its
    config.yaml (or `replay_overrides`) gives; the learning-rate schedule ends with the budget. On
    several processes the slowest one's step time counts, rank 0 times the monitor (which only it
    runs) and its choice is every process's.
    """
    settings = config.train
    began = time.perf_counter()
    step_seconds, monitor_seconds = measure(config, data, steps, warmup)
    main = dist.process_rank() == 0
    # Checkpoints and logging take the last few percent; the monitor runs every knn_every epochs.
    # Steady steps ran 5-7 % slower than these first ones in the demo runs (389 and 360 img/s
    # after 411 and 387 measured): plan 92 % of what is left.
    seconds = 0.92 * (60 * settings.budget_minutes - (time.perf_counter() - began))
    steps_per_epoch = len(data) // config.optim.batch_size
    epoch_seconds = steps_per_epoch * step_seconds
    if settings.knn_every > 0 and monitor_seconds:
        epoch_seconds += monitor_seconds / settings.knn_every
        seconds -= monitor_seconds  # the last pass, at the end
    chosen = max(int(seconds / epoch_seconds * steps_per_epoch), 1)
    total_steps = dist.from_rank0(lambda: chosen)  # one length, or the processes part ways
    epochs = total_steps / steps_per_epoch
    img_per_s = config.optim.batch_size / step_seconds
    scale = epochs / settings.epochs
    config, scaled = scale_schedules(config, scale)
    config = replace(config, train=replace(settings, budget_minutes=None, epochs=epochs))
    record = {
        "budget_minutes": settings.budget_minutes,
        "img_per_s": round(img_per_s, 1),
        "monitor_seconds": round(monitor_seconds, 2),
        "epochs": epochs,
        "total_steps": total_steps,
        "nominal_epochs": settings.epochs,  # the config's train.epochs before the budget
        "scale": scale,  # epochs / nominal_epochs: the factor of every schedule in epochs
        "scaled": scaled,  # those schedules, as the run has them
    }
    if main:
        log.info(
            "budget %g min: %.0f img/s measured -> %d steps, schedules in epochs x%.4g: %s "
            "(replays this run exactly)",
            settings.budget_minutes,
            img_per_s,
            total_steps,
            scale,
            shlex.join(replay_overrides(config, record)),
        )
    return config, record


def replay_overrides(config: Config, record: dict[str, Any]) -> list[str]:
    """The overrides that give a budget's run without it (`config`: the run's, `record`: its
    "budget" event): train.epochs and the scaled schedules; a scaled parameter group as the whole
    optim.groups mapping (JSON, which YAML reads). The run's config.yaml holds the same values."""
    scaled = record.get("scaled", {})  # none in runs from before schedules were scaled
    groups = [f"optim.groups={json.dumps(config.to_dict()['optim']['groups'])}"]
    return [
        f"train.epochs={config.train.epochs!r}",
        *(f"{k}={v!r}" for k, v in scaled.items() if not k.startswith("optim.groups.")),
        *(groups if any(k.startswith("optim.groups.") for k in scaled) else []),
    ]


def measure(config: Config, data: ImageData, steps: int, warmup: int) -> tuple[float, float]:
    """Seconds of one training step (the slowest process's) and of one kNN monitor pass (rank 0;
    0 elsewhere), on a throwaway copy of the run's parts."""
    probe = replace(config, train=replace(config.train, budget_minutes=None, epochs=1e6))
    parts = Parts.build(probe, data)
    for i in range(warmup):
        parts.step(i)
    timed = time.perf_counter()
    for i in range(warmup, warmup + steps):
        out = parts.step(i)
    out["loss"].item()  # wait for the device
    step_seconds = dist.maximum((time.perf_counter() - timed) / steps)
    main = dist.process_rank() == 0
    monitor = KnnMonitor.create(probe, data, parts.views, parts.device) if main else None
    monitor_seconds = 0.0
    if monitor is not None:
        timed = time.perf_counter()
        monitor(parts.method.encoder)
        monitor_seconds = time.perf_counter() - timed
    return step_seconds, monitor_seconds


# The one rule of a budget's schedules: every setting of these sections (and of each optim.groups
# entry) whose name ends in _epochs or _epoch is a point or length in the recipe's training, so
# it is multiplied by chosen epochs / nominal epochs, shorter and longer alike (warm-up, DINO's
# last-layer freeze and teacher-temperature warm-up, SwAV's prototype freeze and queue start, a
# group's frozen_epochs). Not train.epochs (the length itself), eval.linear_epochs (the probe's
# iterations) or train.knn_every (monitoring). Schedules over progress.fraction (EMA momentum,
# weight decay, the learning rate's cosine) follow the length by themselves.
SCHEDULE_SECTIONS = ("method", "backbone", "views")  # registry specs; and optim, optim.groups


def in_epochs(name: str) -> bool:
    return name.endswith(("_epochs", "_epoch"))


def scale_schedules(config: Config, scale: float) -> tuple[Config, dict[str, float]]:
    """`config` with every schedule in epochs (see SCHEDULE_SECTIONS) multiplied by `scale`, and
    the changed settings by dotted name. A registry spec gets its constructor's default written
    in where it left one out (DINO's teacher_temp_warmup_epochs: 30), so config.yaml states it."""
    scaled: dict[str, float] = {}

    def times_scale(where: str, values: dict[str, Any]) -> dict[str, Any]:
        """The schedules in epochs among `values` that `scale` changes, multiplied by it."""
        out = {}
        for name, value in values.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if in_epochs(name) and number and value * scale != value:  # 0 and inf stay
                out[name] = scaled[f"{where}.{name}"] = value * scale
        return out

    specs = {}
    for section in SCHEDULE_SECTIONS:
        spec = getattr(config, section)
        entry = parameters(SECTIONS[section].get(spec["name"]))
        defaults = {k: p.default for k, p in entry.items() if p.default is not p.empty}
        specs[section] = {**spec, **times_scale(section, {**defaults, **spec})}
    optim = replace(config.optim, **times_scale("optim", asdict(config.optim)))
    groups = {
        prefix: replace(group, **times_scale(f"optim.groups.{prefix}", asdict(group)))
        for prefix, group in optim.groups.items()
    }
    optim = replace(optim, groups=groups)
    return replace(config, optim=optim, **specs), scaled
