"""Training curves as a PNG drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H, MARGIN = 420, 260, 48


def plot_curves(metrics: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Two panels: training loss against step, kNN top-1 against epoch."""
    loss = [(r["step"], r["loss"]) for r in metrics if "loss" in r and "step" in r]
    knn = [(r["epoch"], r["knn_top1"]) for r in metrics if "knn_top1" in r]
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H + 24), "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    draw.text((8, 4), title, fill="black", font=font)
    _panel(draw, font, (0, 24), loss, "loss", "step", "#1f77b4")
    _panel(draw, font, (PANEL_W, 24), knn, "kNN top-1 (%)", "epoch", "#d62728")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _panel(draw, font, origin, points, ylabel, xlabel, color) -> None:  # noqa: ANN001
    x0, y0 = origin[0] + MARGIN, origin[1] + 8
    w, h = PANEL_W - MARGIN - 16, PANEL_H - MARGIN - 8
    draw.rectangle([x0, y0, x0 + w, y0 + h], outline="#888888")
    draw.text((x0, y0 + h + 18), xlabel, fill="black", font=font)
    draw.text((x0 + 4, y0 + 2), ylabel, fill=color, font=font)
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
    for i in range(5):  # x ticks
        value = x_lo + (x_hi - x_lo) * i / 4
        px, _ = to_pixel(value, y_lo)
        draw.line([px, y0 + h, px, y0 + h + 3], fill="#888888")
        draw.text((px - 8, y0 + h + 4), f"{value:.3g}", fill="black", font=font)
    pixels = [to_pixel(x, y) for x, y in points]
    if len(pixels) > 1:
        draw.line(pixels, fill=color, width=2)
    for px, py in pixels if len(pixels) < 40 else []:
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
