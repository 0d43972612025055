"""Training time that counts only the time the process was running.

A wall clock (time.perf_counter) also counts the time a process is stopped: SIGSTOP, Ctrl-Z, a
cluster scheduler's suspend, a frozen container. A compare run stopped for half an hour while the
test suite ran drew an 8-minute kNN curve out to 38.6 minutes. (A suspended machine is no
problem: perf_counter is CLOCK_MONOTONIC on Linux, mach_absolute_time on macOS, and neither
advances while the machine sleeps.)

The rule: the clock adds up the wall time between consecutive readings (`tick` or `seconds`),
except an interval longer than PAUSE_SECONDS in which the process got less than CPU_FRACTION of
it as CPU time (time.process_time, all threads): a stopped process accrues none, and that
interval counts zero. Read the clock at every step, so that an interval is one step and a stop
costs at most the one step it fell in.

Why these thresholds: a running training step keeps the CPU busy. On a GPU, PyTorch's default
synchronisation spins or yields (CPU time) and a step lasts well under PAUSE_SECONDS; on a CPU the
step is the computation itself. A long wait with an idle CPU — blocking I/O, another rank's
barrier in a multi-process run — would count zero only if a single interval lasted over
PAUSE_SECONDS; these are rare and short against the stops this clock is for (minutes). With many
threads, process_time runs faster than the wall clock, so a stop shorter than
(threads x step time) / CPU_FRACTION still counts: a short stop barely matters, a long one is
caught.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PAUSE_SECONDS = 5.0  # an interval shorter than this always counts
CPU_FRACTION = 0.2  # ... a longer one counts only if CPU time was at least this share of it


class TrainingClock:
    """Seconds of training so far: `seconds_before` (earlier sittings of a resumed run) plus the
    running time since the clock was made, without the intervals the process was stopped."""

    def __init__(
        self,
        seconds_before: float = 0.0,
        wall: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self._wall, self._cpu = wall, cpu
        self._last_wall, self._last_cpu = wall(), cpu()
        self._seconds = seconds_before
        self.paused = 0.0  # wall seconds not counted: the stops seen so far

    def tick(self) -> None:
        """Take in the interval since the last reading; cheap enough for every step (a few µs)."""
        wall, cpu = self._wall(), self._cpu()
        interval, used = wall - self._last_wall, cpu - self._last_cpu
        if interval > PAUSE_SECONDS and used < CPU_FRACTION * interval:
            self.paused += interval
        else:
            self._seconds += interval
        self._last_wall, self._last_cpu = wall, cpu

    def seconds(self) -> float:
        """Training time so far, over every sitting (time-to-accuracy)."""
        self.tick()
        return self._seconds
