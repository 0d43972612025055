"""The training loop of every task (pre-training, supervised training, fine-tuning), read top to
bottom; the task is the method. Beside it: what a step needs (engine/parts.py), the step and its
precision (engine/step.py), the length a time budget buys (engine/budget.py), the log (log.py)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

import selfsup.dist as dist
from selfsup.build import finetune_config, in_memory_config, load_data, settle_data
from selfsup.config import Config, load_config
from selfsup.data.subsets import labelled_indices, save_labelled, subset
from selfsup.engine.budget import Replan, fit_budget
from selfsup.engine.clock import TrainingClock
from selfsup.engine.collapse import CollapseError, CollapseGuard
from selfsup.engine.log import MetricWindow, ProgressBar, resumed_from
from selfsup.engine.loggers import RunLog, check_installed
from selfsup.engine.monitor import GradientMonitor, KnnMonitor
from selfsup.engine.parts import Parts
from selfsup.files import hold_folder, make_folder, save_checkpoint
from selfsup.methods.base import Method
from selfsup.plot import plot_curves
from selfsup.run import Run, write_config

logger = logging.getLogger(__name__)
FIXED_ON_RESUME = ("method", "backbone", "data", "views", "optim")  # what the checkpoint holds


def finetune(
    run_dir: str | Path, overrides: list[str] | None = None, recipe: str | None = None
) -> Run:
    """Fine-tune the encoder of a finished run with a new linear head on the labels."""
    return train(finetune_config(run_dir, overrides, recipe))


def train(
    config: Config | str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    resume: str | Path | None = None,
    data: Any = None,
    labels: Any = None,
) -> Run:
    """Train a method; `resume` continues a stopped run from its last checkpoint exactly.

    `config` is a Config, a recipe name (`simclr/fashion_mnist`) or a YAML path; `overrides` are
    dotted `section.key=value` strings (on resume only train.* and eval.* keys may change).
    `data`: images in memory, a uint8 array or tensor (N, H, W[, C]), with optional `labels`
    (N,), or a folder path; `config` may then be a method name (`simclr`: its recipe
    simclr/folder) and the recipe's data section is replaced (build.in_memory_config).

    Under torchrun (WORLD_SIZE > 1) every process trains its 1/W of each global batch
    (optim.batch_size) with DistributedDataParallel; rank 0 alone locks (files.hold_folder) and
    writes the run folder, logs, checks and plots. A run resumes on any number of processes.
    """
    if data is not None:
        if resume is not None or isinstance(config, Config):
            raise ValueError(
                "data= goes with a method or recipe name, not with resume= or a Config"
            )
        config, overrides = in_memory_config(config, overrides, data, labels), None
    elif labels is not None:
        raise ValueError("labels= labels the images given as data=; give data= too")
    with dist.process_group_from_env(), ExitStack() as held:
        return _train(config, overrides, resume, held)


def _train(
    config: Config | str | Path | None,
    overrides: list[str] | None,
    resume: str | Path | None,
    held: ExitStack,
) -> Run:
    main = dist.process_rank() == 0  # the process that writes the run folder
    if resume is not None:
        run = Run(resume)
        dist.from_rank0(lambda: held.enter_context(hold_folder(run.path)))
        config = run.config.replace(overrides or [])
        changed = {k for k in FIXED_ON_RESUME if getattr(config, k) != getattr(run.config, k)}
        if changed:
            raise ValueError(f"on resume only train.* and eval.* may change, not {sorted(changed)}")
        if config.train.target != run.config.train.target:  # its checkpoint holds another branch
            raise ValueError(
                f"train.target cannot change on resume (the run's is {run.config.train.target}); "
                f"start a new run for train.target={config.train.target}"
            )
    elif not isinstance(config, Config):
        if config is None:
            raise ValueError("train() needs a config, a recipe name or a run folder to resume")
        config = load_config(config, overrides)
    elif overrides:
        config = config.replace(overrides)
    settings = config.train
    check_installed(settings.loggers)  # before anything is made or trained
    if settings.threads:
        torch.set_num_threads(settings.threads)

    if resume is None:
        make_folder(settings.out_dir, "train.out_dir")  # before the data and the budget's steps
        config = settle_data(config)  # data.size: auto -> the size, written to config.yaml
    data = load_data(config, "train")
    run_dir = run.path if resume is not None else None
    # Semi-supervised: the method trains on the labelled subset; the kNN monitor and the collapse
    # guard still see the whole split.
    labelled = labelled_indices(data.labels, settings.label_fraction, settings.seed, run_dir)
    train_data = data if labelled is None else subset(data, labelled)
    budget: dict[str, Any] = {}
    replan: Replan | None = None
    if resume is None and settings.budget_minutes is not None:
        config, budget, replan = fit_budget(config, train_data)
        settings = config.train
    # Weights of the runs it starts from (train.init, train.teacher) load unless a checkpoint of
    # this run will replace them.
    fresh = resume is None or not run.has_checkpoint
    parts = Parts.build(config, train_data, run_dir, init_weights=fresh)
    if resume is None:

        def create() -> Path:
            run = Run.create(config, parts.info)
            held.enter_context(hold_folder(run.path))
            if labelled is not None:
                save_labelled(run.path, settings.label_fraction, settings.seed, labelled)
            return run.path

        run = Run(dist.from_rank0(create))  # one folder, its time-stamped name chosen by rank 0
    else:
        dist.from_rank0(lambda: write_config(run.path, config))
    method, batches = parts.method, parts.batches
    steps_per_epoch, total_steps = batches.steps_per_epoch, parts.schedule.steps
    last_step = min(total_steps, settings.max_steps or total_steps)
    log = held.enter_context(RunLog.open(run, config)) if main else RunLog([])
    monitor = KnnMonitor.create(config, data, parts.views, parts.device, True) if main else None
    gradients = GradientMonitor.create(config, train_data, parts.views, parts.device)
    guard = CollapseGuard.create(config, data, parts.views, parts.device) if main else None

    step, seconds_before = 0, 0.0  # seconds_before: training time of earlier sittings
    if resume is not None and run.has_checkpoint:
        checkpoint = run.checkpoint()
        step = parts.load_state_dict(checkpoint, run.checkpoint_path)
        seconds_before = checkpoint.get("seconds", 0.0)
        if main:
            log.truncate_after(step)
            logger.info(resumed_from(step, last_step, steps_per_epoch, checkpoint.get("saved_at")))
    elif resume is not None and main:  # it stopped before its first checkpoint
        logger.warning(f"{run.path} has no checkpoint yet: training it from step 0")
        log.truncate_after(0)
    elif resume is None and main:
        log.write({"event": "start", "step": 0, **_describe(config, method)})
        if budget:
            log.write({"event": "budget", "step": 0, **budget})
    dist.barrier()  # the others read nothing of the folder before rank 0 has written it

    bar = ProgressBar(last_step, step, batches.batch_size, enabled=settings.progress and main)
    clock = TrainingClock(seconds_before)  # every sitting, without the time it was stopped
    window, last_save = MetricWindow(batches.batch_size, clock), time.perf_counter()

    def seconds() -> float:
        return round(clock.seconds(), 2)

    saved_step = step if resume is not None else -1

    def save() -> None:
        """Checkpoint this step, once: previous.pt then keeps a different step than last.pt."""
        nonlocal saved_step
        if step != saved_step and main:
            save_checkpoint(
                {**parts.state_dict(), "step": step, "seconds": seconds(), "saved_at": time.time()},
                run.checkpoint_path,
            )
            saved_step = step

    def planned_again() -> None:
        """The budget's re-plan (engine/budget.py Replan): the length from the loop's own step
        time, the rest of the schedules stretched over it, into config.yaml before it is used."""
        nonlocal config, last_step
        steps, step_seconds = dist.from_rank0(lambda: replan.steps(step))
        parts.schedule.stretch(step, steps)
        config = replace(config, train=replace(config.train, replan=(step, steps)))
        last_step = min(steps, settings.max_steps or steps)
        bar.total = last_step
        if main:
            write_config(run.path, config)
            record = replan.record(step, steps, step_seconds, batches.batch_size)
            log.write(record)
            logger.info(
                "budget: %.0f img/s in the run itself -> %d steps instead of %d (epochs %.4g, "
                "the schedules' rest x%.3g)",
                record["img_per_s"],
                steps,
                replan.planned,
                record["epochs"],
                1 / record["stretch"],
            )

    method.train()
    stop, restore_handlers = _stop_at_the_end_of_the_step()
    if replan is not None:
        replan.start()
    try:
        while step < last_step:
            out = parts.step(step)
            clock.tick()  # every step: a stop then costs at most the step it fell in
            step += 1
            epoch = step / steps_per_epoch

            window.add(out)
            if step % settings.log_every == 0 or step == last_step:
                lr = parts.schedule.learning_rate(step - 1)
                line = window.line(step, epoch, lr, run.checkpoint_path)
                if settings.collapse_guard:
                    line.update(dist.from_rank0(partial(_check, guard, method, step, line, log)))
                if main:
                    log.write(line)
                window.restart()
            if gradients is not None and step % settings.gradients_every == 0:
                decomposition = gradients(method, step)  # on every process (see GradientMonitor)
                if main:
                    event = {"event": "gradients", "step": step, "epoch": round(epoch, 4)}
                    log.write({**event, **decomposition})
            bar.update(step, loss=out["loss"].detach())  # a float only when the bar is drawn

            epoch_end = step % steps_per_epoch == 0
            # rank 0 alone: the others go on and wait for it in the next step's gradient exchange
            if epoch_end and monitor and _due(step, steps_per_epoch, settings.knn_every, last_step):
                with replan.excluded() if replan else nullcontext():
                    knn = monitor(method.encoder)  # its own time is training time too
                log.write({"step": step, "epoch": epoch, **knn, "seconds": seconds()})
                method.train()
            if epoch_end or time.perf_counter() - last_save > 60 * settings.checkpoint_minutes:
                save()
                last_save = time.perf_counter()
            if replan is not None and step == replan.at_step:
                planned_again()
            if stop:  # an interrupted run loses nothing: resume continues from this very step
                save()
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        raise
    finally:
        restore_handlers()
    save()
    bar.close()
    if main:
        if monitor and not any("knn_top1" in r and r["step"] == step for r in run.metrics):
            knn = monitor(method.encoder)
            log.write({"step": step, "epoch": step / steps_per_epoch, **knn, "seconds": seconds()})
        log.write({"event": "end", "step": step})
        plot_curves(run.metrics, run.path / "curves.png", title=run.path.name)
    dist.barrier()  # the run folder is complete when train() returns, on every process
    return run


def _check(
    guard: CollapseGuard | None, method: Method, step: int, line: dict[str, Any], log: RunLog
) -> dict[str, float]:
    """The collapse guard's statistics; on collapse the event is logged and CollapseError raised
    (on every process, through dist.from_rank0)."""
    if guard is None:
        return {}
    try:
        return guard(method.encoder, step)
    except CollapseError as error:
        log.write({**line, **error.stats, "event": "collapse", "message": str(error)})
        raise


def _stop_at_the_end_of_the_step() -> tuple[list[int], Callable[[], None]]:
    """Ctrl-C and SIGTERM (a scheduler's kill; torchrun ending the other processes when one
    fails) ask the loop to stop once the step under way is done, and save that step first: a
    checkpoint taken in the middle of a step would hold the step's batch position and random
    state beside the weights from before it, and the resumed run would differ from one straight
    through. A second signal stops at once, without a save (the last checkpoint stands).

    Returns the list the signals are put in (empty: go on) and a function that restores the
    previous handlers.
    """
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        return requested, lambda: None

    def request(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    return requested, restore


def _due(step: int, steps_per_epoch: int, every: float, last_step: int) -> bool:
    if every <= 0:
        return False
    interval = max(round(every * steps_per_epoch), 1)
    return step % interval == 0 or step == last_step


def _describe(config: Config, method: Method) -> dict[str, Any]:
    parameters = sum(p.numel() for p in method.parameters() if p.requires_grad)
    names = {key: getattr(config, key)["name"] for key in ("method", "backbone", "data")}
    return {"parameters": parameters, **names, "processes": dist.processes()}
