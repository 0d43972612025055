"""Training curves as a PNG drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H, MARGIN = 420, 260, 48


def plot_curves(metrics: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Two panels: training loss against step, kNN top-1 against epoch."""
    loss = [(r["step"], r["loss"]) for r in metrics if "loss" in r and "step" in r]
    # the monitor's lines; evaluation events (no epoch) carry knn_top1 too
    knn = [(r["epoch"], r["knn_top1"]) for r in metrics if "knn_top1" in r and "epoch" in r]
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H + 24), "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    draw.text((8, 4), title, fill="black", font=font)
    _panel(draw, font, (0, 24), [(loss, "#1f77b4")], "loss", "step")
    _panel(draw, font, (PANEL_W, 24), [(knn, "#d62728")], "kNN top-1 (%)", "epoch")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# Distinct colours for several runs on one chart (matplotlib's default cycle).
# matplotlib's tab10, then ten darker or distinct tones: a comparison of every method (~20 lines)
# gives each its own colour
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
           "#7b4173", "#000000", "#e6550d", "#31a354", "#ce6dbd", "#6baed6")  # fmt: skip


def plot_series(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    groups: dict[str, str] | None = None,
    xticks: list[tuple[float, str]] | None = None,
) -> None:
    """Several named lines on one panel, with a legend (e.g. each run's kNN against time).

    `groups` maps a line's name to a legend entry: lines of one group (the seeds of one recipe)
    share a colour and one legend line. By default every line is its own group. `xticks`:
    (x, label) pairs to name on the x axis instead of five numeric ticks.
    """
    groups = groups or {name: name for name in series}
    labels = list(dict.fromkeys(groups[name] for name in series))
    color = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    image = Image.new("RGB", (PANEL_W * 2, PANEL_H + 24 + 16 * len(labels)), "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    draw.text((8, 4), title, fill="black", font=font)
    lines = [(points, color[groups[name]]) for name, points in series.items()]
    _panel(draw, font, (0, 24), lines, ylabel, xlabel, width=2 * PANEL_W, xticks=xticks)
    for i, label in enumerate(labels):
        y = PANEL_H + 24 + 16 * i
        draw.line([MARGIN, y + 7, MARGIN + 24, y + 7], fill=color[label], width=3)
        draw.text((MARGIN + 32, y), label, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _panel(draw, font, origin, lines, ylabel, xlabel, width=PANEL_W, xticks=None) -> None:  # noqa: ANN001
    """Axes with ticks and one polyline per (points, colour) in `lines`, on shared scales;
    `xticks`: (x, label) pairs instead of five numeric x ticks, in two rows when crowded."""
    x0, y0 = origin[0] + MARGIN, origin[1] + 8
    w, h = width - MARGIN - 16, PANEL_H - MARGIN - 8
    draw.rectangle([x0, y0, x0 + w, y0 + h], outline="#888888")
    draw.text((x0, y0 + h + 18), xlabel, fill="black", font=font)
    draw.text((x0 + 4, y0 + 2), ylabel, fill=lines[0][1] if len(lines) == 1 else "black", font=font)
    points = [p for line, _ in lines for p in line]
    if not points:
        draw.text((x0 + w // 3, y0 + h // 2), "no data yet", fill="#888888", font=font)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    pad = (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - x_lo) / (x_hi - x_lo) * w, y0 + h - (y - y_lo) / (y_hi - y_lo) * h

    for i in range(5):  # y ticks
        value = y_lo + (y_hi - y_lo) * i / 4
        _, py = to_pixel(x_lo, value)
        draw.line([x0 - 3, py, x0, py], fill="#888888")
        draw.text((origin[0] + 2, py - 6), f"{value:.3g}", fill="black", font=font)
    if xticks is None:
        xticks = [(x_lo + (x_hi - x_lo) * i / 4, None) for i in range(5)]
    crowded = any(draw.textlength(t or "", font=font) > w / len(xticks) for _, t in xticks)
    for i, (value, text) in enumerate(xticks):  # x ticks
        px, _ = to_pixel(value, y_lo)
        draw.line([px, y0 + h, px, y0 + h + 3], fill="#888888")
        if text is None:
            draw.text((px - 8, y0 + h + 4), f"{value:.3g}", fill="black", font=font)
        else:
            row = 13 * (i % 2) if crowded else 0
            length = draw.textlength(text, font=font)  # centred, kept inside the panel
            left = min(max(px - length / 2, origin[0] + 2), origin[0] + width - length - 2)
            draw.text((left, y0 + h + 4 + row), text, fill="black", font=font)
    for line, color in lines:
        pixels = [to_pixel(x, y) for x, y in line]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels if len(pixels) < 40 else []:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)


def plot_stages(
    results: dict[str, list[tuple[str, float]]],
    order: list[str],
    path: Path,
    ylabel: str = "linear top-1 (%)",
    title: str = "",
) -> None:
    """Probe accuracy against network stage, one line per run ({label: [(stage, accuracy)]}).

    x is a stage's place in `order` (eval.stages.stage_order), named on the axis, so runs with
    different stages (ResNet or ViT, projectors of 2 or 3 layers) share one axis.
    """
    place = {stage: i for i, stage in enumerate(order)}
    series = {label: [(place[s], v) for s, v in points] for label, points in results.items()}
    ticks = [(float(i), stage) for i, stage in enumerate(order)]
    plot_series(series, path, "", ylabel, title, xticks=ticks)
