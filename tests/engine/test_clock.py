"""The training clock counts the time the process ran, not the time it was stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import selfsup.engine.clock as clock_module
from selfsup.engine.clock import CPU_FRACTION, PAUSE_SECONDS, TrainingClock


class FakeTime:
    """A wall clock and a CPU clock that the test advances by hand."""

    def __init__(self) -> None:
        self.wall_now, self.cpu_now = 100.0, 7.0

    def wall(self) -> float:
        return self.wall_now

    def cpu(self) -> float:
        return self.cpu_now

    def advance(self, wall: float, cpu: float) -> None:
        self.wall_now += wall
        self.cpu_now += cpu


def fake_clock(seconds_before: float = 0.0) -> tuple[TrainingClock, FakeTime]:
    fake = FakeTime()
    return TrainingClock(seconds_before, wall=fake.wall, cpu=fake.cpu), fake


def test_busy_steps_count_their_wall_time():
    clock, fake = fake_clock()
    for _ in range(10):
        fake.advance(wall=0.5, cpu=0.45)
        clock.tick()
    assert clock.seconds() == pytest.approx(5.0)
    assert clock.paused == 0.0


def test_a_long_interval_without_cpu_time_is_a_stop_and_counts_zero():
    clock, fake = fake_clock()
    fake.advance(wall=1.0, cpu=1.0)
    clock.tick()
    fake.advance(wall=1800.0, cpu=0.3)  # stopped for half an hour in the middle of a step
    clock.tick()
    fake.advance(wall=1.0, cpu=1.0)
    assert clock.seconds() == pytest.approx(2.0)
    assert clock.paused == pytest.approx(1800.0)


def test_short_idle_waits_count_as_training():
    """A step waiting for the GPU or the disk with an idle CPU is training time."""
    clock, fake = fake_clock()
    fake.advance(wall=0.9 * PAUSE_SECONDS, cpu=0.0)
    assert clock.seconds() == pytest.approx(0.9 * PAUSE_SECONDS)


def test_a_long_interval_with_enough_cpu_time_counts():
    """The kNN monitor or a checkpoint can take longer than PAUSE_SECONDS: they are running."""
    clock, fake = fake_clock()
    fake.advance(wall=60.0, cpu=60.0 * CPU_FRACTION * 1.1)
    assert clock.seconds() == pytest.approx(60.0)
    fake.advance(wall=60.0, cpu=60.0 * 4)  # four busy threads
    assert clock.seconds() == pytest.approx(120.0)


def test_a_resumed_run_starts_from_its_earlier_sittings_time():
    clock, fake = fake_clock(seconds_before=300.0)
    assert clock.seconds() == 300.0
    fake.advance(wall=2.0, cpu=2.0)
    assert clock.seconds() == pytest.approx(302.0)


CHILD = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("clock", sys.argv[1])
clock_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(clock_module)
clock_module.PAUSE_SECONDS = 1.0  # a 2-second stop is then long enough to be seen
clock = clock_module.TrainingClock()
start = time.perf_counter()
print("ready", flush=True)
while time.perf_counter() - start < 3.0:
    sum(range(2000))  # a busy step
    clock.tick()
print(json.dumps({"wall": time.perf_counter() - start, "seconds": clock.seconds(),
                  "paused": clock.paused}), flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="no SIGSTOP on this system")
def test_a_process_stopped_with_sigstop_does_not_count_the_stop():
    path = Path(clock_module.__file__)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(2.0)
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    result = json.loads(out)
    assert result["wall"] >= 3.0
    assert 1.9 <= result["paused"] <= result["wall"] - 0.5  # the stop, plus the step it hit
    assert result["seconds"] == pytest.approx(result["wall"] - result["paused"], abs=0.05)
