"""The training loop shared by every task: self-supervised pre-training, supervised training,
fine-tuning. One explicit loop, read top to bottom; the task is the method (selfsup/methods/)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

import selfsup.dist as dist
from selfsup.build import (
    build_method,
    build_views,
    data_info,
    finetune_config,
    load_data,
    pick_device,
)
from selfsup.config import Config, load_config
from selfsup.data.datasets import ImageData
from selfsup.data.loader import Batches
from selfsup.data.subsets import labelled_indices, save_labelled, subset
from selfsup.engine.accumulate import Accumulation
from selfsup.engine.collapse import CollapseError, CollapseGuard
from selfsup.engine.log import ProgressBar
from selfsup.engine.monitor import GradientMonitor, KnnMonitor
from selfsup.engine.optim import Schedule, build_optimizer
from selfsup.files import (
    CheckpointError,
    MetricsLog,
    make_folder,
    one_line,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from selfsup.methods.base import Method
from selfsup.plot import plot_curves
from selfsup.run import Run
from selfsup.step import Progress, Views


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
) -> Run:
    """Train a method; `resume` continues a stopped run from its last checkpoint exactly.

    `config` is a Config, a recipe name (`simclr/fashion_mnist`) or a YAML path; `overrides` are
    dotted `section.key=value` strings (on resume only train.* and eval.* keys may change).

    Under torchrun (WORLD_SIZE > 1) every process trains its 1/W of each global batch
    (optim.batch_size) with DistributedDataParallel; rank 0 alone writes the run folder, logs,
    checks and plots. A run resumes on any number of processes.
    """
    with dist.process_group_from_env():
        return _train(config, overrides, resume)


def _train(
    config: Config | str | Path | None, overrides: list[str] | None, resume: str | Path | None
) -> Run:
    main = dist.process_rank() == 0  # the process that writes the run folder
    if resume is not None:
        run = Run(resume)
        config = run.config.replace(overrides or [])
        changed = {
            k
            for k in ("method", "backbone", "data", "views", "optim")
            if getattr(config, k) != getattr(run.config, k)
        }
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
    if settings.threads:
        torch.set_num_threads(settings.threads)

    if resume is None:
        make_folder(settings.out_dir, "train.out_dir")  # before the data and the budget's steps
    data = load_data(config, "train")
    run_dir = run.path if resume is not None else None
    # Semi-supervised: the method trains on the labelled subset; the kNN monitor and the collapse
    # guard still see the whole split.
    labelled = labelled_indices(data.labels, settings.label_fraction, settings.seed, run_dir)
    train_data = data if labelled is None else subset(data, labelled)
    budget: dict[str, Any] = {}
    if resume is None and settings.budget_minutes is not None:
        config, budget = fit_budget(config, train_data)
        settings = config.train
    # Weights of the runs it starts from (train.init, train.teacher) load unless a checkpoint of
    # this run will replace them.
    fresh = resume is None or not run.has_checkpoint
    parts = Parts.build(config, train_data, run_dir, init_weights=fresh)
    if resume is None:

        def create() -> Path:
            run = Run.create(config, parts.info)
            if labelled is not None:
                save_labelled(run.path, settings.label_fraction, settings.seed, labelled)
            return run.path

        run = Run(dist.from_rank0(create))  # one folder, its time-stamped name chosen by rank 0
    else:
        config_text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        dist.from_rank0(lambda: (run.path / "config.yaml").write_text(config_text))
    method, batches = parts.method, parts.batches
    steps_per_epoch, total_steps = batches.steps_per_epoch, parts.schedule.total_steps
    last_step = min(total_steps, settings.max_steps or total_steps)
    log = MetricsLog(run.metrics_path)
    monitor = KnnMonitor.create(config, data, parts.views, parts.device) if main else None
    gradients = GradientMonitor.create(config, train_data, parts.views, parts.device)
    guard = CollapseGuard.create(config, data, parts.views, parts.device) if main else None

    step, seconds_before = 0, 0.0  # seconds_before: training time of earlier sittings
    if resume is not None and run.has_checkpoint:
        checkpoint = run.checkpoint()
        step = parts.load_state_dict(checkpoint, run.checkpoint_path)
        seconds_before = checkpoint.get("seconds", 0.0)
        if main:
            log.truncate_after(step)
    elif resume is None and main:
        start = {"event": "start", "step": 0, "parameters": _count(method), **_describe(config)}
        log.write({**start, "processes": dist.processes()})
        if budget:
            log.write({"event": "budget", "step": 0, **budget})
    dist.barrier()  # the others read nothing of the folder before rank 0 has written it

    bar = ProgressBar(last_step, step, batches.batch_size, enabled=settings.progress and main)
    sums: dict[str, Tensor] = {}
    window_start, window_steps, last_save = time.perf_counter(), 0, time.perf_counter()
    sitting_start = time.perf_counter()

    def seconds() -> float:
        """Training time so far, over every sitting of a resumed run (time-to-accuracy)."""
        return round(seconds_before + time.perf_counter() - sitting_start, 2)

    saved_step = step if resume is not None else -1

    def save() -> None:
        """Checkpoint this step, once: previous.pt then keeps a different step than last.pt."""
        nonlocal saved_step
        if step != saved_step and main:
            save_checkpoint(
                {**parts.state_dict(), "step": step, "seconds": seconds()}, run.checkpoint_path
            )
            saved_step = step

    method.train()
    stop_on_sigterm = _sigterm_as_interrupt()
    try:
        while step < last_step:
            out = parts.step(step)
            step += 1

            for key, value in out.items():
                if value.dim() == 0:  # scalars are logged; tensors for after_step are not
                    sums[key] = sums.get(key, 0) + value.detach().float()
            window_steps += 1
            if step % settings.log_every == 0 or step == last_step:
                elapsed = time.perf_counter() - window_start
                throughput = window_steps * batches.batch_size / max(elapsed, 1e-9)
                # the means over all processes: the global batch's loss, the same on each rank
                means = dist.mean(torch.stack(list(sums.values()))).tolist()
                record = {k: v / window_steps for k, v in zip(sums, means, strict=True)}
                if not all(map(_finite, record.values())):
                    raise FloatingPointError(
                        f"loss became {record['loss']} at step {step}; lower optim.lr or set "
                        f"optim.clip (the last good checkpoint is {run.checkpoint_path})"
                    )
                line = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    **record,
                    "lr": parts.schedule.learning_rate(step - 1),
                    "img_per_s": round(throughput, 1),
                    "seconds": seconds(),
                }
                if settings.collapse_guard:
                    line.update(dist.from_rank0(partial(_check, guard, method, step, line, log)))
                if main:
                    log.write(line)
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            if gradients is not None and step % settings.gradients_every == 0:
                decomposition = gradients(method, step)  # on every process (see GradientMonitor)
                if main:
                    epoch = round(step / steps_per_epoch, 4)
                    log.write({"event": "gradients", "step": step, "epoch": epoch, **decomposition})
            bar.update(step, loss=out["loss"].detach())  # a float only when the bar is drawn

            epoch_end = step % steps_per_epoch == 0
            # rank 0 alone: the others go on and wait for it in the next step's gradient exchange
            if epoch_end and monitor and _due(step, steps_per_epoch, settings.knn_every, last_step):
                knn = monitor(method.encoder)  # its own time is training time too
                log.write(
                    {"step": step, "epoch": step / steps_per_epoch, **knn, "seconds": seconds()}
                )
                method.train()
            if epoch_end or time.perf_counter() - last_save > 60 * settings.checkpoint_minutes:
                save()
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        save()  # an interrupted run loses nothing: resume continues from this very step
        bar.close()
        raise
    finally:
        stop_on_sigterm()
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
    guard: CollapseGuard | None, method: Method, step: int, line: dict[str, Any], log: MetricsLog
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


@dataclass
class Parts:
    """Everything one training step needs, built from a config: the same for training, the
    budget calibration and benchmarks/throughput.py."""

    config: Config
    device: torch.device
    info: dict[str, Any]
    views: Any
    method: Method
    model: torch.nn.Module  # what runs forward: the method, or its DDP wrapper (dist.data_parallel)
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    batches: Batches
    labels: Tensor | None  # on the device; only for a method that uses labels
    generator: torch.Generator
    precision: Precision
    memory_format: torch.memory_format
    accumulation: Accumulation  # train.accumulate micro-batches per step

    @classmethod
    def build(
        cls,
        config: Config,
        data: ImageData,
        run_dir: Path | None = None,
        init_weights: bool = True,
    ) -> Parts:
        """Seeded parts of a new run, or of the run in `run_dir`; `init_weights`: load the
        weights of the runs it starts from (build_method)."""
        settings = config.train
        device = dist.local_device(pick_device(settings.device))
        torch.manual_seed(settings.seed)
        views = build_views(config)
        info = data_info(data, views)
        views.set_stats(info["mean"], info["std"])
        method = build_method(config, info, run_dir, init_weights).to(device)
        if settings.sync_bn:
            method = dist.sync_batch_norm(method, device)
        memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        method = method.to(memory_format=memory_format)
        if settings.compile:
            method.backbone.forward = torch.compile(method.backbone.forward)
        batches = Batches(
            data.images if data.mapped else data.images.to(device),  # mapped: read per batch
            config.optim.batch_size,
            seed=settings.seed,
            rank=dist.process_rank(),
            world=dist.processes(),
            device=device,
        )
        if batches.local_batch_size % settings.accumulate:
            raise ValueError(
                f"train.accumulate={settings.accumulate} does not divide the batch of each of "
                f"{dist.processes()} process(es) ({batches.local_batch_size} images); choose "
                f"optim.batch_size as a multiple of {dist.processes() * settings.accumulate}"
            )
        total_steps = max(round(settings.epochs * batches.steps_per_epoch), 1)
        optimizer = build_optimizer(method, config.optim)
        if method.uses_labels and data.labels is None:
            raise ValueError(
                f"method '{config.method['name']}' trains on labels and dataset "
                f"'{config.data['name']}' has none; choose a labelled dataset"
            )
        labels = data.labels.to(device) if method.uses_labels else None
        return cls(
            config,
            device,
            info,
            views,
            method,
            dist.data_parallel(method, device),
            optimizer,
            Schedule(optimizer, config.optim, batches.steps_per_epoch, total_steps),
            batches,
            labels,
            torch.Generator(device).manual_seed(settings.seed),
            Precision(settings.precision, device),
            memory_format,
            Accumulation(settings.accumulate),
        )

    def step(self, step: int) -> dict[str, Tensor]:
        """Optimisation step number `step` (0-based) on the next batch; returns its outputs."""
        spe = self.batches.steps_per_epoch
        progress = Progress(step, step / spe, step / self.schedule.total_steps)
        self.schedule.apply(step)
        images, index = self.batches.next()
        # every process draws the augmentations of the whole global batch and keeps its rows:
        # the same views as on one process, whatever the number of processes
        share = (self.batches.rank, self.batches.world)
        large, small = self.views(images, self.generator, share)
        labels = self.labels[index] if self.labels is not None else None
        return training_step(
            self.method,
            self.optimizer,
            Views(self._layout(large), self._layout(small), index, labels),
            progress,
            self.precision,
            self.config.optim.clip,
            self.schedule,
            model=self.model,
            accumulation=self.accumulation,
        )

    def _layout(self, crops: list[Tensor]) -> list[Tensor]:
        return [crop.contiguous(memory_format=self.memory_format) for crop in crops]

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": rng_state(self.generator),
            "scaler": self.precision.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> int:
        """Restore the checkpoint read from `path`; returns its step."""
        try:
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.batches.load_state_dict(state["batches"])
            set_rng_state(state["rng"], self.generator)
        except (RuntimeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint {path} does not fit this run ({one_line(error)}); was "
                f"checkpoints/ copied from another run?"
            ) from error
        if state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        return state["step"]


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
        print(
            f"budget {settings.budget_minutes:g} min: {img_per_s:.0f} img/s measured -> "
            f"{total_steps} steps, train.epochs={epochs!r} (replays this run exactly)",
            file=sys.stderr,
        )
    record = {
        "budget_minutes": settings.budget_minutes,
        "img_per_s": round(img_per_s, 1),
        "monitor_seconds": round(monitor_seconds, 2),
        "epochs": epochs,
        "total_steps": total_steps,
    }
    return replace(config, train=replace(settings, budget_minutes=None, epochs=epochs)), record


def _sigterm_as_interrupt() -> Any:
    """Treat SIGTERM (a scheduler's kill) like Ctrl-C, so the loop saves before it exits.

    Returns a function that restores the previous handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _due(step: int, steps_per_epoch: int, every: float, last_step: int) -> bool:
    if every <= 0:
        return False
    interval = max(round(every * steps_per_epoch), 1)
    return step % interval == 0 or step == last_step


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _count(method: Method) -> int:
    return sum(p.numel() for p in method.parameters() if p.requires_grad)


def _describe(config: Config) -> dict[str, Any]:
    return {
        "method": config.method["name"],
        "backbone": config.backbone["name"],
        "data": config.data["name"],
    }


class Precision:
    """Autocast context and gradient scaler: bf16 autocast on CUDA by default, fp32 on CPU."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name == "auto":
            name = "bf16" if device.type == "cuda" else "fp32"
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if name not in dtypes:
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got '{name}'")
        self.device_type, self.dtype = device.type, dtypes[name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self) -> Any:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def training_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    views: Views,
    progress: Progress,
    precision: Precision,
    clip: float | None = None,
    schedule: Schedule | None = None,
    model: torch.nn.Module | None = None,
    accumulation: Accumulation | None = None,
) -> dict[str, Tensor]:
    """One optimisation step: forward, backward, frozen groups dropped, clipping, the optimizer
    step, then the method's state updates from what forward returned.

    `model`: the module whose forward runs, when it is not `method` itself (its DDP wrapper).
    `accumulation`: run the batch as micro-batches (train.accumulate, engine/accumulate.py).
    """
    scaler = precision.scaler
    if accumulation is not None and accumulation.count > 1:
        optimizer.zero_grad(set_to_none=True)
        out = accumulation.run(method, model or method, views, progress, precision)
    else:
        with precision.autocast():
            out = (model or method)(views, progress)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
    if schedule is not None:
        schedule.drop_frozen_gradients(progress.step)
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(method.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        method.after_step(progress, out)
    return out
