"""Where the time of a training step goes: a per-part profile of recipes, on CPU.

    python benchmarks/step_profile.py                                  # the demo recipe
    python benchmarks/step_profile.py simclr/fashion_mnist byol/fashion_mnist moco_v2/fashion_mnist
    python benchmarks/step_profile.py simclr/fashion_mnist --compile --json profile.json

(Not named profile.py: a script's folder comes first on sys.path, so a profile.py here would
shadow the standard library's `profile`, which cProfile imports, and torch.compile imports
cProfile: torch.compile would fail.)

Each recipe's parts are built as training builds them (`Parts.build`, through throughput.build).
After `--warmup` plain steps, `--steps` instrumented steps alternate with as many plain
`parts.step` calls, whose time is the whole step measured without instrumentation; alternating,
both see the same machine.

The instrumented step mirrors `Parts.step` and engine/step.py's `training_step` without
accumulation or DDP (it refuses train.accumulate > 1 and several processes): the same objects
called in the same order, the time between the calls taken with time.perf_counter (CPU ops are
synchronous; on a GPU each boundary synchronises first):

    batch             parts.batches.next()
    augmentation      parts.views(...), the labels of the batch and the crops' memory layout
    backbone forward  every call of a module of the backbone's class (online backbone, EMA target,
                      momentum encoder: throughput.backbone_modules), timed by forward pre/post
                      hooks: the sum of the outermost intervals inside the method's forward
    heads and loss    the rest of the method's forward
    backward          scaler.scale(loss).backward()
    optimiser         schedule.apply, zero_grad, frozen groups' gradients dropped, clipping,
                      scaler.step (the optimizer step) and scaler.update
    after_step        method.after_step under no_grad (EMA, queue, memory bank, DINO's centre)

tests/test_benchmarks.py checks that this step gives the losses and weights of `parts.step`, so
the mirror cannot drift from the engine unnoticed.

The per-run costs of engine/train.py's loop, amortised per step as the loop incurs them (the
kNN pass measured once, eagerly; the others, and the kNN pass under --compile, by a second call):

    kNN monitor       one pass ÷ (steps per epoch × train.knn_every)
    collapse guard    one check ÷ train.log_every (it runs with each metrics line)
    metrics line      the clock tick and MetricWindow.add of every step, plus one line (the mean
                      over the window and its write to metrics.jsonl) ÷ train.log_every
    checkpoint        one save ÷ its interval: every epoch, or every train.checkpoint_minutes at
                      the measured step time when that comes first

Left out: the progress bar (redrawn at most every 0.2 s) and train.gradients_every (off unless
set). "%" is of the total per step: the step's parts plus the amortised per-run costs.

--compile profiles each recipe twice, eagerly and with train.compile=true (torch.compile of the
backbone's forward), and reports the compile time apart from the steady step: the compiled run's
warm-up steps beyond as many steady steps, plus the first monitor pass and guard check beyond
their second ones (the encoder recompiles for eval mode). It compiles from scratch, without
torch's on-disk caches, as the first run of a recipe on a machine does (--warm-cache: with them,
as a repeated run does). Compiling pays after
compile seconds / (1 − compiled total / eager total) of training (the eager run's time); the
verdict says whether that is within --budget-minutes (15, the demo's budget).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from throughput import backbone_modules, build

import selfsup.dist as dist
from selfsup.engine.clock import TrainingClock
from selfsup.engine.collapse import CollapseGuard
from selfsup.engine.log import MetricWindow
from selfsup.engine.monitor import KnnMonitor
from selfsup.engine.parts import Parts, own_random_stream
from selfsup.files import MetricsLog, save_checkpoint
from selfsup.step import Progress, Views

# Wall-clock seconds; tests/test_benchmarks.py swaps in the process's CPU time, which other
# processes on a busy machine do not inflate.
CLOCK = time.perf_counter
STEP_PARTS = (
    "batch",
    "augmentation",
    "backbone forward",
    "heads and loss",
    "backward",
    "optimiser",
    "after_step",
)
RUN_PARTS = ("kNN monitor", "collapse guard", "metrics line", "checkpoint")


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes the clock honest on `device`: nothing on the CPU, a synchronize on CUDA."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class Laps:
    """Seconds between consecutive `lap(name)` calls, summed by name."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.seconds = sync, dict.fromkeys(STEP_PARTS, 0.0)
        self.sync()
        self.last = CLOCK()

    def lap(self, name: str) -> None:
        self.sync()
        now = CLOCK()
        self.seconds[name] += now - self.last
        self.last = now


class BackboneTimer:
    """Seconds spent inside backbone forwards while active: forward pre/post hooks on every module
    of the backbone's class, counting the outermost call only if they ever nest."""

    def __init__(self, method: torch.nn.Module, sync: Callable[[], None]) -> None:
        self.modules, self.sync = backbone_modules(method), sync
        self.seconds, self.depth, self.began = 0.0, 0, 0.0
        self.hooks: list[Any] = []

    def __enter__(self) -> BackboneTimer:
        self.seconds, self.depth = 0.0, 0
        for m in self.modules:
            self.hooks.append(m.register_forward_pre_hook(self._enter))
            self.hooks.append(m.register_forward_hook(self._leave))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _enter(self, module: torch.nn.Module, args: tuple) -> None:
        if self.depth == 0:
            self.sync()
            self.began = CLOCK()
        self.depth += 1

    def _leave(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.sync()
            self.seconds += CLOCK() - self.began


def instrumented_step(
    parts: Parts, step: int, sync: Callable[[], None]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Optimisation step number `step`, as `parts.step(step)` runs it (Parts.step, then
    training_step without accumulation or DDP); returns its outputs and the seconds of each part
    (STEP_PARTS)."""
    method, optimizer, schedule = parts.method, parts.optimizer, parts.schedule
    scaler = parts.precision.scaler
    laps = Laps(sync)
    # Parts.step
    progress = Progress(
        step, step / parts.batches.steps_per_epoch, step / parts.schedule.total_steps
    )
    schedule.apply(step)
    own_random_stream(parts.config.train.seed, step)
    laps.lap("optimiser")
    images, index = parts.batches.next()
    laps.lap("batch")
    share = (parts.batches.rank, parts.batches.world)
    large, small = parts.views(images, parts.generator, share)
    labels = parts.labels[index] if parts.labels is not None else None
    views = Views(parts._layout(large), parts._layout(small), index, labels)
    laps.lap("augmentation")
    # training_step
    with BackboneTimer(method, sync) as backbone, parts.precision.autocast():
        out = parts.model(views, progress)
    laps.lap("heads and loss")  # the backbone's share moves to its own part below
    laps.seconds["heads and loss"] -= backbone.seconds
    laps.seconds["backbone forward"] += backbone.seconds
    optimizer.zero_grad(set_to_none=True)
    laps.lap("optimiser")
    scaler.scale(out["loss"]).backward()
    laps.lap("backward")
    schedule.drop_frozen_gradients(progress.step)
    if parts.config.optim.clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(method.parameters(), parts.config.optim.clip)
    scaler.step(optimizer)
    scaler.update()
    laps.lap("optimiser")
    with torch.no_grad():
        method.after_step(progress, out)
    laps.lap("after_step")
    return out, laps.seconds


def _seconds(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = CLOCK()
    fn()
    sync()
    return CLOCK() - start


def _first_and_steady(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, float]:
    """Seconds of a first call (which may compile) and of a second one."""
    return _seconds(fn, sync), _seconds(fn, sync)


def profile(
    recipe: str,
    overrides: list[str],
    steps: int,
    warmup: int,
    compiled: bool = False,
    cold: bool = True,
) -> dict[str, Any]:
    """Milliseconds per step of each part of `recipe`'s training (see the module docstring);
    `compiled`: with train.compile=true, compiling from scratch unless not `cold`."""
    if compiled:
        torch.compiler.reset()  # nothing compiled for an earlier recipe is reused
        with torch.compiler.config.patch(force_disable_caches=cold), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "dynamo_pgo force disabled")  # as asked
            return _profile(recipe, overrides, steps, warmup, compiled)
    return _profile(recipe, overrides, steps, warmup, compiled)


def _profile(
    recipe: str, overrides: list[str], steps: int, warmup: int, compiled: bool
) -> dict[str, Any]:
    overrides = [*overrides, f"train.compile={str(compiled).lower()}"]
    config, data, parts = build(recipe, overrides)
    if config.train.accumulate > 1 or dist.processes() > 1:
        raise ValueError("the profile mirrors a step without train.accumulate or DDP")
    if compiled and warmup < 1:
        raise ValueError("--compile needs at least one warm-up step (it compiles)")
    settings, method, sync = config.train, parts.method.train(), synchronizer(parts.device)
    spe = parts.batches.steps_per_epoch
    step = 0

    began = CLOCK()
    for _ in range(warmup):
        parts.step(step)
        step += 1
    sync()
    warmup_seconds = CLOCK() - began

    # the loop's per-step bookkeeping (engine/train.py): the clock and the metric window
    clock = TrainingClock()
    window = MetricWindow(parts.batches.batch_size, clock)
    totals = dict.fromkeys(STEP_PARTS, 0.0)
    sums, wholes = [], []  # each instrumented step's parts together; each plain step
    bookkeeping = 0.0
    for _ in range(steps):
        out, seconds = instrumented_step(parts, step, sync)
        step += 1
        for name, s in seconds.items():
            totals[name] += s
        sums.append(sum(seconds.values()))
        start = CLOCK()
        clock.tick()
        window.add(out)
        bookkeeping += CLOCK() - start
        wholes.append(_seconds(partial(parts.step, step), sync))
        step += 1
    step_parts = {name: s / steps for name, s in totals.items()}
    whole_step = sum(wholes) / steps

    # per-run costs
    run: dict[str, float] = {}
    detail: dict[str, Any] = {}
    compile_extra = 0.0
    monitor = KnnMonitor.create(config, data, parts.views, parts.device)
    knn_interval = max(round(settings.knn_every * spe), 1)
    if monitor is None:
        run["kNN monitor"] = 0.0
        detail["kNN monitor"] = "off (train.knn_every 0, or no labels or test split)"
    else:
        if compiled:
            first, pass_seconds = _first_and_steady(lambda: monitor(method.encoder), sync)
            compile_extra += max(first - pass_seconds, 0.0)
        else:
            pass_seconds = _seconds(lambda: monitor(method.encoder), sync)
        method.train()
        run["kNN monitor"] = pass_seconds / knn_interval
        detail["kNN monitor"] = f"{pass_seconds:.2f} s a pass, every {knn_interval} steps"

    guard = CollapseGuard.create(config, data, parts.views, parts.device)
    if guard is None:
        run["collapse guard"] = 0.0
        detail["collapse guard"] = "off (train.collapse_guard false)"
    else:
        first, check = _first_and_steady(lambda: guard(method.encoder, step), sync)
        if compiled:
            compile_extra += max(first - check, 0.0)
        run["collapse guard"] = check / settings.log_every
        detail["collapse guard"] = f"{check * 1e3:.1f} ms a check, every {settings.log_every} steps"

    with tempfile.TemporaryDirectory() as folder:
        log = MetricsLog(Path(folder) / "metrics.jsonl")
        checkpoint = Path(folder) / "checkpoints" / "last.pt"

        def metrics_line() -> None:
            lr = parts.schedule.learning_rate(step - 1)
            log.write(window.line(step, step / spe, lr, checkpoint))

        _, line = _first_and_steady(metrics_line, sync)

        def save() -> None:
            save_checkpoint({**parts.state_dict(), "step": step, "seconds": 1.0}, checkpoint)

        _, save_seconds = _first_and_steady(save, sync)  # the second also keeps previous.pt
        size = checkpoint.stat().st_size
    run["metrics line"] = bookkeeping / steps + line / settings.log_every
    detail["metrics line"] = (
        f"{bookkeeping / steps * 1e3:.2f} ms a step, {line * 1e3:.1f} ms a line every "
        f"{settings.log_every} steps"
    )
    by_time = math.ceil(60 * settings.checkpoint_minutes / whole_step)
    save_interval = max(min(spe, by_time), 1)
    run["checkpoint"] = save_seconds / save_interval
    detail["checkpoint"] = (
        f"{save_seconds:.2f} s a save ({size / 2**20:.1f} MiB), every {save_interval} steps"
    )

    step_sum = sum(step_parts.values())
    total = step_sum + sum(run.values())
    shares = {**step_parts, **run}
    return {
        "recipe": recipe,
        "compiled": compiled,
        "batch_size": parts.batches.batch_size,
        "steps_per_epoch": spe,
        "steps": steps,
        "warmup": warmup,
        "ms": {name: s * 1e3 for name, s in shares.items()},
        "percent": {name: 100 * s / total for name, s in shares.items()},
        "step_parts_ms": step_sum * 1e3,
        "whole_step_ms": whole_step * 1e3,
        # step by step, to see the spread: the instrumented steps' sums and the plain steps
        "step_sums_ms": [s * 1e3 for s in sums],
        "whole_steps_ms": [s * 1e3 for s in wholes],
        "total_ms": total * 1e3,
        "img_per_s": parts.batches.batch_size / whole_step,
        "run_detail": detail,
        "warmup_seconds": warmup_seconds,
        # the compiled run: what its first steps and first monitor / guard calls took beyond
        # steady ones
        "compile_seconds": (
            max(warmup_seconds - warmup * whole_step, 0.0) + compile_extra if compiled else 0.0
        ),
    }


def compile_verdict(eager: dict[str, Any], compiled: dict[str, Any], budget: float) -> dict:
    """Whether compiling pays within `budget` minutes: after how much training the compile time
    is won back by the faster steps (amortised per-run costs included)."""
    ratio = compiled["total_ms"] / eager["total_ms"]
    seconds = compiled["compile_seconds"]
    minutes = seconds / (1 - ratio) / 60 if ratio < 1 else None  # None: it never pays
    return {
        "compile_seconds": seconds,
        "eager_ms": eager["total_ms"],
        "compiled_ms": compiled["total_ms"],
        "speedup": 1 / ratio,
        "break_even_minutes": minutes,
        "budget_minutes": budget,
        "pays": minutes is not None and minutes <= budget,
    }


def table(r: dict[str, Any]) -> str:
    mode = "compiled" if r["compiled"] else "eager"
    lines = [
        f"## {r['recipe']} ({mode}; batch {r['batch_size']}, {r['steps_per_epoch']} steps an "
        f"epoch; {r['steps']} steps after {r['warmup']} warm-up)",
        f"{'part':22s} {'ms/step':>9s} {'%':>6s}",
    ]
    for name in STEP_PARTS:
        lines.append(f"{name:22s} {r['ms'][name]:9.2f} {r['percent'][name]:6.1f}")
    ratio = r["step_parts_ms"] / r["whole_step_ms"]
    best = min(r["step_sums_ms"]) / min(r["whole_steps_ms"])  # the fastest of each: less noise
    lines += [
        f"{'= sum of the step':22s} {r['step_parts_ms']:9.2f}",
        f"{'  whole step, plain':22s} {r['whole_step_ms']:9.2f}"
        f"  (sum / whole {ratio:.3f}, fastest steps {best:.3f}; {r['img_per_s']:.0f} img/s)",
    ]
    for name in RUN_PARTS:
        lines.append(
            f"{name:22s} {r['ms'][name]:9.2f} {r['percent'][name]:6.1f}  {r['run_detail'][name]}"
        )
    lines.append(f"{'= total per step':22s} {r['total_ms']:9.2f} {100:6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=["simclr/fashion_mnist"])
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every recipe")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (each kind)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also with train.compile=true")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="compile with the machine's compile caches (what a repeated run pays)",
    )
    parser.add_argument("--budget-minutes", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": sys.argv[1:] if argv is None else argv,
        "recipes": {},
    }
    print(f"# {results['machine']}, torch {results['torch']}, {results['threads']} threads")
    for recipe in args.recipes:
        eager = profile(recipe, args.set, args.steps, args.warmup)
        print(table(eager) + "\n")
        entry: dict[str, Any] = {"eager": eager}
        if args.compile:
            compiled = profile(
                recipe, args.set, args.steps, args.warmup, compiled=True, cold=not args.warm_cache
            )
            verdict = compile_verdict(eager, compiled, args.budget_minutes)
            print(table(compiled))
            minutes = verdict["break_even_minutes"]
            pays = "never pays" if minutes is None else f"pays after {minutes:.1f} min of training"
            print(
                f"compile: {verdict['compile_seconds']:.1f} s; {verdict['speedup']:.2f}x the "
                f"eager speed ({verdict['eager_ms']:.1f} -> {verdict['compiled_ms']:.1f} ms a "
                f"step with per-run costs); {pays}: "
                f"{'pays' if verdict['pays'] else 'does not pay'} within a "
                f"{args.budget_minutes:g}-minute budget\n"
            )
            entry.update(compiled=compiled, compile=verdict)
        results["recipes"][recipe] = entry
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
