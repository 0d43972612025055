"""The progress bar: one redrawn line on a terminal, one display output replaced in place in a
Jupyter notebook, a line every 30 s in a log file or pipe."""

import io
import sys
import time
import types

import pytest

import selfsup.engine.log as log
from selfsup.engine.log import ProgressBar, notebook_display


class Clock:
    """time.perf_counter that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHandle:
    def __init__(self) -> None:
        self.updates: list[str] = []

    def update(self, shown, raw=False):
        assert raw
        self.updates.append(shown["text/plain"])


class FakeDisplay:
    """IPython.display.display as ProgressBar calls it: the first line, then handle.update."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.handle = FakeHandle()

    def __call__(self, shown, raw=False, display_id=None):
        assert raw and display_id is True
        self.shown.append(shown["text/plain"])
        return self.handle


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    return clock


@pytest.fixture
def notebook(monkeypatch):
    display = FakeDisplay()
    monkeypatch.setattr(log, "notebook_display", lambda: display)
    return display


def test_notebook_bar_replaces_one_display_output_at_most_twice_a_second(clock, notebook, capsys):
    bar = ProgressBar(total=100, images_per_step=32)
    for step in range(1, 101):
        clock.now += 0.1
        bar.update(step, loss=1.0 / step)
    bar.close()

    assert len(notebook.shown) == 1  # one output, every later line replaces it
    lines = notebook.shown + notebook.handle.updates
    assert 15 <= len(lines) <= 21  # 10 s of training at most one line each 0.5 s
    assert lines[-1].startswith("[" + "#" * 24 + "] 100/100 loss 0.01 320 img/s ETA 00:00")
    assert all("\r" not in line and "\n" not in line for line in lines)
    assert capsys.readouterr().err == ""  # nothing on the kernel's stderr


def test_notebook_bar_shows_the_step_it_stopped_at_on_close(clock, notebook):
    bar = ProgressBar(total=100)
    for step in range(1, 38):
        clock.now += 0.01
        bar.update(step, loss=0.5)
    assert notebook.shown == []  # 0.37 s: not yet time for a line
    bar.close()
    assert len(notebook.shown) == 1 and " 37/100 loss 0.5 " in notebook.shown[0]
    bar.close()
    assert len(notebook.shown) == 1 and notebook.handle.updates == []


def test_a_given_stream_is_written_even_in_a_notebook(clock, notebook):
    stream = io.StringIO()
    bar = ProgressBar(total=2, stream=stream)
    for step in (1, 2):
        clock.now += 31
        bar.update(step, loss=1.0)
    assert notebook.shown == [] and stream.getvalue().count("\n") == 2


def test_a_disabled_bar_shows_nothing_in_a_notebook(clock, notebook):
    bar = ProgressBar(total=3, enabled=False)
    for step in range(1, 4):
        clock.now += 1
        bar.update(step, loss=1.0)
    bar.close()
    assert notebook.shown == []


def test_terminal_bar_redraws_one_line_with_carriage_returns(clock):
    stream = Terminal()
    bar = ProgressBar(total=10, stream=stream)
    for step in range(1, 11):
        clock.now += 0.1
        bar.update(step, loss=2.0)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 5  # every 0.2 s: steps 2, 4, 6, 8 and the last
    assert text.endswith("] 10/10 loss 2 0 img/s ETA 00:00\x1b[K\n")
    assert text.count("\n") == 1  # the line is ended once, on close


def test_file_bar_writes_a_line_every_30_seconds_and_the_last(clock):
    stream = io.StringIO()
    bar = ProgressBar(total=100, stream=stream)
    for step in range(1, 101):
        clock.now += 1
        bar.update(step, loss=1.0)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["30/100", "60/100", "90/100", "100/100"]
    assert "\r" not in stream.getvalue()


def test_notebook_is_a_jupyter_kernel_not_a_terminal_ipython(monkeypatch):
    def display(*args, **kwargs):
        pass

    shell = types.SimpleNamespace(config={})
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", types.SimpleNamespace(display=display))
    assert notebook_display() is None  # IPython in a terminal: stderr is the terminal
    shell.config["IPKernelApp"] = {}
    assert notebook_display() is display


def test_notebook_is_no_kernel_when_ipython_is_not_loaded_or_not_running(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert notebook_display() is None
    assert "IPython" not in sys.modules  # looked up, not imported
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: None  # imported, no shell running (a script that imports it)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    assert notebook_display() is None
