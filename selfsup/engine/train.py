"""The training loop shared by every method: one explicit loop, read top to bottom."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from selfsup.config import Config, load_config
from selfsup.data.loader import Batches
from selfsup.engine.build import build_method, build_views, data_info, load_data, pick_device
from selfsup.engine.checkpoint import rng_state, save_atomic, set_rng_state
from selfsup.engine.log import MetricsLog, ProgressBar
from selfsup.engine.monitor import KnnMonitor
from selfsup.engine.optim import build_optimizer, learning_rate, peak_lr, set_learning_rate
from selfsup.methods.base import Method, Progress, Views
from selfsup.plot import plot_curves
from selfsup.run import Run


def train(
    config: Config | str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    resume: str | Path | None = None,
) -> Run:
    """Pre-train a method; `resume` continues a stopped run from its last checkpoint exactly.

    `config` is a Config, a recipe name (`simclr/fashion_mnist`) or a YAML path; `overrides` are
    dotted `section.key=value` strings (on resume only train.* keys may change).
    """
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
    elif not isinstance(config, Config):
        if config is None:
            raise ValueError("train() needs a config, a recipe name or a run folder to resume")
        config = load_config(config, overrides)
    elif overrides:
        config = config.replace(overrides)
    settings = config.train
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    torch.manual_seed(settings.seed)

    data = load_data(config, "train")
    views = build_views(config)
    info = data_info(data, views)
    views.set_stats(info["mean"], info["std"])
    if resume is None:
        run = Run.create(config, info)
    else:
        (run.path / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    method = build_method(config, info).to(device)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    method = method.to(memory_format=memory_format)
    if settings.compile:
        method.backbone.forward = torch.compile(method.backbone.forward)
    optimizer = build_optimizer(method, config.optim)
    batches = Batches(data.images.to(device), config.optim.batch_size, seed=settings.seed)
    generator = torch.Generator(device).manual_seed(settings.seed)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = max(round(settings.epochs * steps_per_epoch), 1)
    last_step = min(total_steps, settings.max_steps or total_steps)
    log = MetricsLog(run.metrics_path)
    monitor = KnnMonitor.create(config, data, views, device)

    precision = Precision(settings.precision, device)
    step = 0
    if resume is not None and run.checkpoint_path.is_file():
        state = run.checkpoint()
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"], generator)
        if state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        step = state["step"]
        log.truncate_after(step)
    elif resume is None:
        log.write({"event": "start", "step": 0, "parameters": _count(method), **_describe(config)})

    bar = ProgressBar(last_step, step, batches.batch_size, enabled=settings.progress)
    sums: dict[str, torch.Tensor] = {}
    window_start, window_steps, last_save = time.perf_counter(), 0, time.perf_counter()
    throughput = 0.0

    def save() -> None:
        state = {
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "batches": batches.state_dict(),
            "rng": rng_state(generator),
            "scaler": precision.scaler.state_dict(),
            "step": step,
        }
        save_atomic(state, run.checkpoint_path)

    method.train()
    stop_on_sigterm = _sigterm_as_interrupt()
    try:
        while step < last_step:
            progress = Progress(step, step / steps_per_epoch, step / total_steps)
            set_learning_rate(
                optimizer,
                learning_rate(config.optim, step, steps_per_epoch, total_steps),
                peak_lr(config.optim),
            )
            images, index = batches.next()
            out = training_step(
                method,
                optimizer,
                views(images, generator),
                index,
                progress,
                precision,
                config.optim.clip,
                memory_format,
            )
            loss = out["loss"]
            step += 1

            for key, value in out.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
            window_steps += 1
            if step % settings.log_every == 0 or step == last_step:
                elapsed = time.perf_counter() - window_start
                throughput = window_steps * batches.batch_size / max(elapsed, 1e-9)
                record = {k: v.item() / window_steps for k, v in sums.items()}
                if not all(map(_finite, record.values())):
                    raise FloatingPointError(
                        f"loss became {record['loss']} at step {step}; lower optim.lr or set "
                        f"optim.clip (the last good checkpoint is {run.checkpoint_path})"
                    )
                log.write(
                    {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        **record,
                        "lr": optimizer.param_groups[0]["lr"],
                        "img_per_s": round(throughput, 1),
                    }
                )
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            bar.update(step, loss=loss)  # converted to a float only when the bar is drawn

            epoch_end = step % steps_per_epoch == 0
            if epoch_end and monitor and _due(step, steps_per_epoch, settings.knn_every, last_step):
                log.write(
                    {"step": step, "epoch": step / steps_per_epoch, **monitor(method.backbone)}
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
    if monitor and not any("knn_top1" in r and r["step"] == step for r in run.metrics):
        log.write({"step": step, "epoch": step / steps_per_epoch, **monitor(method.backbone)})
    log.write({"event": "end", "step": step})
    plot_curves(run.metrics, run.path / "curves.png", title=run.path.name)
    return run


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
    crops: tuple[list[torch.Tensor], list[torch.Tensor]],
    index: torch.Tensor | None,
    progress: Progress,
    precision: Precision,
    clip: float | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch of augmented crops (large, small); returns the outputs."""
    large, small = crops
    views = Views(
        [v.contiguous(memory_format=memory_format) for v in large],
        [v.contiguous(memory_format=memory_format) for v in small],
        index,
    )
    with precision.autocast():
        out = method(views, progress)
    optimizer.zero_grad(set_to_none=True)
    scaler = precision.scaler
    scaler.scale(out["loss"]).backward()
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(method.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        method.after_step(progress)
    return out
