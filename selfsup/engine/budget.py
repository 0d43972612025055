"""A training length from a time budget (train.budget_minutes): measure, then choose the epochs."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import selfsup.dist as dist
from selfsup.config import Config
from selfsup.data.datasets import ImageData
from selfsup.engine.monitor import KnnMonitor
from selfsup.engine.parts import Parts

log = logging.getLogger(__name__)


def fit_budget(
    config: Config, data: ImageData, steps: int = 8, warmup: int = 2
) -> tuple[Config, dict[str, float]]:
    """train.epochs that fill train.budget_minutes on this machine, written into the config;
    also returns what was measured (logged as the run's "budget" event).

    Throughput is measured on `steps` steps of a throwaway copy of the run's parts (after
    `warmup`), and one kNN monitor pass is timed, so the run itself is exactly the one that
    `train.epochs=<chosen>` gives; the learning-rate schedule then ends with the budget. On
    several processes the slowest one's step time counts, rank 0 times the monitor (which only it
    runs) and its choice is every process's.
    """
    settings = config.train
    began = time.perf_counter()
    probe = replace(config, train=replace(settings, budget_minutes=None, epochs=1e6))
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
    del parts
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
    if main:
        log.info(
            "budget %g min: %.0f img/s measured -> %d steps, train.epochs=%r (replays this run "
            "exactly)",
            settings.budget_minutes,
            img_per_s,
            total_steps,
            epochs,
        )
    record = {
        "budget_minutes": settings.budget_minutes,
        "img_per_s": round(img_per_s, 1),
        "monitor_seconds": round(monitor_seconds, 2),
        "epochs": epochs,
        "total_steps": total_steps,
    }
    return replace(config, train=replace(settings, budget_minutes=None, epochs=epochs)), record
