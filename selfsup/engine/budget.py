"""A training length from a time budget (train.budget_minutes): measure, then choose the epochs,
and stretch every schedule given in epochs to that length (`scale_schedules`)."""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import selfsup.dist as dist
from selfsup.config import SECTIONS, Config
from selfsup.data.datasets import ImageData
from selfsup.engine.monitor import KnnMonitor
from selfsup.engine.parts import Parts
from selfsup.registry import parameters

log = logging.getLogger(__name__)


# The plan from calibration leaves 3 % for what its steps do not show (the collapse guard,
# metric lines, checkpoints: ~1 % in the step profile; steady steps that run slower than the
# first ones: 5-7 % in the demo runs of 2026-11). After REPLAN_AT of the planned steps the loop's
# own step time, all of that included, sets the length once more (`Replan`), to REPLAN_MARGIN of
# the time left.
FIRST_PLAN = 0.97
REPLAN_AT = 0.1
REPLAN_MARGIN = 0.99


def fit_budget(
    config: Config, data: ImageData, steps: int = 8, warmup: int = 2
) -> tuple[Config, dict[str, Any], Replan]:
    """train.epochs that fill train.budget_minutes on this machine, written into the config with
    every schedule in epochs scaled to them (`scale_schedules`); also returns what was measured
    and the scale (logged as the run's "budget" event), and the `Replan` the loop applies after
    REPLAN_AT of those steps.

    Throughput is measured on `steps` steps of a throwaway copy of the run's parts (after
    `warmup`), and one kNN monitor pass is timed, so the run itself is exactly the one that its
    config.yaml (or `replay_overrides`) gives; the learning-rate schedule ends with the budget. On
    several processes the slowest one's step time counts, rank 0 times the monitor (which only it
    runs) and its choice is every process's.
    """
    settings = config.train
    began = time.perf_counter()
    deadline = began + 60 * settings.budget_minutes
    step_seconds, monitor_seconds = measure(config, data, steps, warmup)
    main = dist.process_rank() == 0
    seconds = FIRST_PLAN * (deadline - time.perf_counter())
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
    monitor_every = settings.knn_every * steps_per_epoch if main else 0.0
    replan = Replan(deadline, total_steps, steps_per_epoch, monitor_every, monitor_seconds)
    return config, record, replan


@dataclass
class Replan:
    """A budget's one correction of its length: after REPLAN_AT of the planned steps (`at_step`),
    the loop's own time per step (its kNN monitor passes excluded, they are counted one by one)
    gives the number of steps that ends the run at the budget's deadline, and the rest of the
    schedules is stretched over them (train.replan, engine/optim.py Schedule.stretch), so a step
    time that differs from the calibration's neither overruns the budget nor leaves it unused."""

    deadline: float  # time.perf_counter() at which the budget ends
    planned: int  # the steps planned from calibration
    steps_per_epoch: int
    monitor_every: float  # steps between kNN monitor passes; 0: none (or not this process's)
    monitor_seconds: float  # one pass, as calibration measured it
    began: float = 0.0
    monitor: float = 0.0  # seconds of monitor passes since `began`

    @property
    def at_step(self) -> int | None:
        """The step after which the length is planned again (None: the run is too short)."""
        return min(max(round(REPLAN_AT * self.planned), 1), self.planned - 1) or None

    def start(self) -> None:
        """The loop's first step begins now."""
        self.began, self.monitor = time.perf_counter(), 0.0

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Time that is not a step's (a kNN monitor pass)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.monitor += time.perf_counter() - began

    def steps(self, step: int) -> tuple[int, float]:
        """The run's new length in steps, `step` steps into it, and the seconds a step took."""
        now = time.perf_counter()
        step_seconds = (now - self.began - self.monitor) / step
        left = self.deadline - now
        per_step = step_seconds
        if self.monitor_every:
            left -= self.monitor_seconds  # the pass at the end
            per_step += self.monitor_seconds / self.monitor_every
        return step + max(round(REPLAN_MARGIN * left / per_step), 1), step_seconds

    def record(self, step: int, steps: int, step_seconds: float, batch_size: int) -> dict:
        """The "replan" event of metrics.jsonl."""
        return {
            "event": "replan",
            "step": step,
            "img_per_s": round(batch_size / step_seconds, 1),
            "planned_steps": self.planned,
            "total_steps": steps,
            "epochs": steps / self.steps_per_epoch,
            "stretch": (self.planned - step) / (steps - step),
        }


def replay_overrides(config: Config, record: dict[str, Any]) -> list[str]:
    """The overrides that give a budget's run without it (`config`: the run's, `record`: its
    "budget" event): train.epochs and the scaled schedules; a scaled parameter group as the whole
    optim.groups mapping (JSON, which YAML reads). The run's config.yaml holds the same values."""
    scaled = record.get("scaled", {})  # none in runs from before schedules were scaled
    groups = [f"optim.groups={json.dumps(config.to_dict()['optim']['groups'])}"]
    replan = config.train.replan
    return [
        f"train.epochs={config.train.epochs!r}",
        *([f"train.replan=[{replan[0]}, {replan[1]}]"] if replan else []),
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
