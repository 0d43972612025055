"""The charts of selfsup, drawn with matplotlib: a run's training curves, several runs' lines on
one panel (compare), probe accuracy per network stage (stages).

Each function returns its matplotlib Figure and, given a path, writes it there in the format its
suffix names (.png or .svg). Figures are built without pyplot: no global backend or figure list,
nothing to close, safe to call from any thread. matplotlib is imported when the first chart is
drawn, not when selfsup is (it adds ~0.4 s to a start).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = (".png", ".svg")
DPI = 100  # pixels per inch of a PNG: a 9-inch-wide chart is 900 pixels
MARKERS_BELOW = 40  # a line of fewer points marks each one (a monitor's few epochs)

# Distinct colours for several runs on one chart: matplotlib's tab10, then ten darker or distinct
# tones, so that a comparison of every method (~20 lines) gives each its own colour.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
           "#7b4173", "#000000", "#e6550d", "#31a354", "#ce6dbd", "#6baed6")  # fmt: skip


def plot_curves(metrics: list[dict[str, Any]], path: Path | None = None, title: str = "") -> Figure:
    """Two panels: training loss against step, kNN top-1 against epoch."""
    loss = [(r["step"], r["loss"]) for r in metrics if "loss" in r and "step" in r]
    # the monitor's lines; evaluation events (no epoch) carry knn_top1 too
    knn = [(r["epoch"], r["knn_top1"]) for r in metrics if "knn_top1" in r and "epoch" in r]
    figure = _figure(width=10, height=3.6)
    left, right = figure.subplots(1, 2)
    _lines(left, [(loss, PALETTE[0], None)], "step", "training loss")
    _lines(right, [(knn, PALETTE[3], None)], "epoch", "kNN top-1 (%)")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_series(
    series: dict[str, list[tuple[float, float]]],
    path: Path | None,
    xlabel: str,
    ylabel: str,
    title: str = "",
    groups: dict[str, str] | None = None,
    xticks: list[tuple[float, str]] | None = None,
    thresholds: dict[str, float] | None = None,
) -> Figure:
    """Several named lines on one panel, with a legend (e.g. each run's kNN against time).

    `groups` maps a line's name to a legend entry: lines of one group (the seeds of one recipe)
    share a colour and one legend line. By default every line is its own group. `xticks`:
    (x, label) pairs to name on the x axis instead of numbers. `thresholds`: horizontal dashed
    reference lines by legend entry (the collapse guard's floor).
    """
    groups = groups or {name: name for name in series}
    labels = list(dict.fromkeys(groups[name] for name in series))
    color = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    seen: set[str] = set()
    lines = []
    for name, points in series.items():
        label = groups[name]
        lines.append((points, color[label], None if label in seen else label))
        seen.add(label)
    legend = labels != [ylabel] or bool(thresholds)  # a lone line the y axis names needs none
    figure = _figure(width=9.5 if legend else 8, height=4.2)
    axes = figure.subplots()
    _lines(axes, lines, xlabel, ylabel)
    for i, (label, value) in enumerate((thresholds or {}).items()):
        style = ("--", ":", "-.")[i % 3]
        axes.axhline(value, color="#555555", linestyle=style, linewidth=1, label=label)
    if xticks is not None:
        positions, names = [x for x, _ in xticks], [name for _, name in xticks]
        # ~the characters that fit along the axis, labels centred on evenly spaced ticks
        crowded = len(names) * (max(map(len, names)) + 2) > (70 if legend else 100)
        axes.set_xticks(positions, names, rotation=30 if crowded else 0,
                        ha="right" if crowded else "center")  # fmt: skip
        axes.set_xlim(min(positions) - 0.3, max(positions) + 0.3)
    if legend:  # beside the panel, never over a line; long lists in two columns
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                    ncol=2 if len(labels) > 14 else 1, fontsize="small")  # fmt: skip
    if title:
        axes.set_title(title)
    return _save(figure, path)


def plot_stages(
    results: dict[str, list[tuple[str, float]]],
    order: list[str],
    path: Path | None = None,
    ylabel: str = "linear top-1 (%)",
    title: str = "",
) -> Figure:
    """Probe accuracy against network stage, one line per run ({label: [(stage, accuracy)]}).

    x is a stage's place in `order` (eval.stages.stage_order), named on the axis, so runs with
    different stages (ResNet or ViT, projectors of 2 or 3 layers) share one axis.
    """
    place = {stage: i for i, stage in enumerate(order)}
    series = {label: [(place[s], v) for s, v in points] for label, points in results.items()}
    ticks = [(float(i), stage) for i, stage in enumerate(order)]
    return plot_series(series, path, "network stage", ylabel, title, xticks=ticks)


def save(figure: Figure, path: Path | BinaryIO, format: str | None = None) -> None:
    """Write `figure` to `path` (.png or .svg, by its suffix) or to a binary file in `format`."""
    if isinstance(path, (str, Path)):
        path = Path(path)
        if path.suffix.lower() not in FORMATS:
            raise ValueError(f"a chart is written as .png or .svg, not '{path.name}'")
        format = path.suffix.lower()[1:]
        path.parent.mkdir(parents=True, exist_ok=True)
    # no date in an SVG: a chart of the same numbers is the same file (docs/images stay diffable)
    metadata = {"Date": None} if format == "svg" else None
    figure.savefig(path, format=format, dpi=DPI, metadata=metadata)


def _save(figure: Figure, path: Path | None) -> Figure:
    if path is not None:
        save(figure, path)
    return figure


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    # constrained layout: room for tick labels, titles and a legend beside the panel
    return Figure(figsize=(width, height), layout="constrained")


def _lines(
    axes: Axes,
    lines: Sequence[tuple[list[tuple[float, float]], str, str | None]],
    xlabel: str,
    ylabel: str,
) -> None:
    """One line per (points, colour, legend label or None) on `axes`, with labelled axes whose
    ticks are round numbers (matplotlib's locator: 0, 5, 10, not 0.598, 10.1); whole-numbered x
    (steps) gets whole-numbered ticks."""
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, color="#e5e5e5", linewidth=0.8)
    axes.set_axisbelow(True)
    if all(float(x).is_integer() for points, _, _ in lines for x, _ in points):
        # AutoLocator's steps (MaxNLocator alone also takes 1.5, 3, 4...: 15000, 30000)
        whole = MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True)
        axes.xaxis.set_major_locator(whole)  # steps 2, 3, 4 on a short run, not 2.25
    if not any(points for points, _, _ in lines):
        axes.text(0.5, 0.5, "no data yet", transform=axes.transAxes, ha="center",
                  va="center", color="#888888")  # fmt: skip
        axes.set_xticks([])  # no numbers on an axis with nothing on it
        axes.set_yticks([])
        return
    for points, color, label in lines:
        marker = "o" if len(points) < MARKERS_BELOW else None
        axes.plot([x for x, _ in points], [y for _, y in points], color=color, label=label,
                  linewidth=1.6, marker=marker, markersize=3.5)  # fmt: skip
