"""What the loop shows while it trains: the progress bar (steps, loss, throughput and ETA on one
line) and the window of scalars behind each line of metrics.jsonl."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

import selfsup.dist as dist
from selfsup.engine.clock import TrainingClock


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def resumed_from(
    step: int, last_step: int, steps_per_epoch: int, saved_at: float | None = None
) -> str:
    """Where a resumed run goes on: "resumed from step 4,120 of 9,360 (epoch 2.64), checkpoint
    of 2026-12-06 12:03:11" (`saved_at`: when the checkpoint was written, seconds since 1970;
    checkpoints of versions before 2026-12-06 did not record it)."""
    where = f"resumed from step {step:,} of {last_step:,} (epoch {step / steps_per_epoch:.2f})"
    if saved_at is None:
        return where
    return f"{where}, checkpoint of {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(saved_at))}"


class ProgressBar:
    """One line that redraws itself: on a terminal with carriage returns; in a Jupyter notebook as
    one display output replaced in place (the kernel's stderr is no terminal, and a carriage
    return there would not take back an earlier output); a line every 30 s when stderr is a file
    or a pipe (CI logs). `stream`: where to write instead of stderr (never a notebook display)."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        images_per_step: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.images_per_step = images_per_step
        self.display = notebook_display() if stream is None and enabled else None
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        # a notebook sends each redraw to the browser: twice a second is live enough
        self.every = 0.5 if self.display is not None else 0.2 if self.tty else 30.0
        self.handle: Any = None  # the notebook's display handle, once the first line is shown
        self.undrawn: tuple[int, dict[str, Any]] | None = None  # skipped update; close() shows it
        self.began = self.last = time.perf_counter()

    def update(self, step: int, **values: Any) -> None:
        now = time.perf_counter()
        if not self.enabled:
            return
        if now - self.last < self.every and step < self.total:
            self.undrawn = (step, values)
            return
        self.last, self.undrawn = now, None
        self._draw(self._line(step, now, values))

    def _line(self, step: int, now: float, values: dict[str, Any]) -> str:
        done = step - self.start
        rate = done / (now - self.began) if now > self.began else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        images_per_second = rate * self.images_per_step
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        shown = " ".join(f"{k} {float(v):.4g}" for k, v in values.items())
        return (
            f"[{bar}] {step}/{self.total} {shown} {images_per_second:.0f} img/s "
            f"ETA {format_duration(eta)}"
        )

    def _draw(self, line: str) -> None:
        if self.display is not None:
            shown = {"text/plain": line}
            if self.handle is None:
                self.handle = self.display(shown, raw=True, display_id=True)
            else:
                self.handle.update(shown, raw=True)
            return
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line; in a notebook first show the last step if its update was skipped (an
        interrupted run), so the output says where training stopped."""
        if not self.enabled:
            return
        if self.display is not None:
            if self.undrawn is not None:
                step, values = self.undrawn
                self._draw(self._line(step, time.perf_counter(), values))
                self.undrawn = None
        elif self.tty:
            self.stream.write("\n")
            self.stream.flush()


def notebook_display() -> Callable[..., Any] | None:
    """IPython's `display` when this process is a Jupyter kernel (a notebook in Jupyter, VS Code
    or Colab), else None: a terminal IPython has a real stderr. IPython is looked up, not
    imported, so a process that never loaded it pays nothing."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or "IPKernelApp" not in shell.config:
        return None
    from IPython.display import display

    return display


class MetricWindow:
    """The logged scalars of the steps since the last log line, summed on the device (no sync per
    step); `line` turns them into means over the steps and over the processes."""

    def __init__(self, images_per_step: int, clock: TrainingClock) -> None:
        self.images_per_step, self.clock = images_per_step, clock
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps, self.start = 0, self.clock.seconds()

    def add(self, out: dict[str, Tensor]) -> None:
        for key, value in out.items():
            if value.dim() == 0:  # scalars are logged; tensors for after_step are not
                self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.steps += 1

    def line(self, step: int, epoch: float, lr: float, last_good: Path) -> dict[str, Any]:
        """The metrics line of the window that ends at `step`; a loss that is not finite is an
        error that names `last_good`, the checkpoint to go back to."""
        seconds = self.clock.seconds()  # training time: a stopped process's pause not counted
        elapsed = seconds - self.start
        throughput = self.steps * self.images_per_step / max(elapsed, 1e-9)
        # the means over all processes: the global batch's loss, the same on each rank
        means = dist.mean(torch.stack(list(self.sums.values()))).tolist()
        record = {k: v / self.steps for k, v in zip(self.sums, means, strict=True)}
        if not all(map(_finite, record.values())):
            raise FloatingPointError(
                f"loss became {record['loss']} at step {step}; lower optim.lr or set "
                f"optim.clip (the last good checkpoint is {last_good})"
            )
        return {
            "step": step,
            "epoch": round(epoch, 4),
            **record,
            "lr": lr,
            "img_per_s": round(throughput, 1),
            "seconds": round(seconds, 2),
        }


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
