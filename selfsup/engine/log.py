"""The progress bar: steps, loss, throughput and ETA on one line."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """One redrawn line on a terminal; a line every `every` seconds when stderr is a file."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        images_per_step: int = 0,
        enabled: bool = True,
        stream: TextIO = sys.stderr,
    ) -> None:
        self.total, self.start, self.enabled, self.stream = total, start, enabled, stream
        self.images_per_step = images_per_step
        self.tty = stream.isatty()
        self.every = 0.2 if self.tty else 30.0
        self.began = self.last = time.perf_counter()

    def update(self, step: int, **values: Any) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every and step < self.total):
            return
        self.last = now
        done = step - self.start
        rate = done / (now - self.began) if now > self.began else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        images_per_second = rate * self.images_per_step
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        shown = " ".join(f"{k} {float(v):.4g}" for k, v in values.items())
        line = (
            f"[{bar}] {step}/{self.total} {shown} {images_per_second:.0f} img/s "
            f"ETA {format_duration(eta)}"
        )
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
