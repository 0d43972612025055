"""The charts: written as PNG or SVG by the file's suffix, round numbers on the axes, a legend entry
per run (one per recipe when seeds share a colour), the stages named on the x axis."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from selfsup.plot import plot_curves, plot_series, plot_stages, save

METRICS = [
    *({"step": s, "epoch": s / 47, "loss": 5 * math.exp(-s / 60) + 0.3} for s in range(1, 200, 7)),
    *({"step": 47 * e, "epoch": float(e), "knn_top1": 61.3 + 4.1 * e} for e in range(1, 5)),
    {"event": "eval", "step": 188, "knn_top1": 99.0},  # an evaluation: no epoch, not on the chart
]
SERIES = {  # awkward ends, as a compare chart's minutes are: 0.598 to 10.1
    "simclr seed 0": [(0.598, 36.6), (4.2, 70.3), (10.1, 81.5)],
    "simclr seed 1": [(0.61, 40.2), (4.3, 71.0), (9.8, 80.9)],
    "byol seed 0": [(0.7, 50.0), (5.0, 72.4), (9.9, 78.8)],
}
GROUPS = {name: name.split(" seed")[0] for name in SERIES}
ORDER = ["layer1", "layer2", "layer3", "layer4", "encoder", "projector.1", "projector.out"]


def drawn(figure):
    """The figure after drawing it once (tick labels exist only then)."""
    save(figure, io.BytesIO(), format="png")
    return figure


def is_round(ticks):
    """Evenly spaced by 1, 2, 2.5 or 5 times a power of ten, each a multiple of that step."""
    step = ticks[1] - ticks[0]
    power = 10 ** math.floor(math.log10(step))
    assert any(math.isclose(step, m * power) for m in (1, 2, 2.5, 5)), ticks
    return all(math.isclose(t / step, round(t / step), abs_tol=1e-9) for t in ticks)


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_every_chart_is_written_in_the_format_its_suffix_names(tmp_path, suffix):
    paths = [tmp_path / f"{name}{suffix}" for name in ("curves", "series", "stages")]
    plot_curves(METRICS, paths[0], title="a run")
    plot_series(SERIES, paths[1], "training time (minutes)", "kNN top-1 (%)", groups=GROUPS)
    stages = {"a": [(s, 80.0 + i) for i, s in enumerate(ORDER)]}
    plot_stages(stages, ORDER, paths[2])
    for path in paths:
        data = path.read_bytes()
        if suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
            assert Image.open(path).size[0] >= 600  # wide enough to read
        else:
            assert b"<svg" in data[:1000] and data.rstrip().endswith(b"</svg>")


def test_a_suffix_that_is_not_png_or_svg_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\.png or \.svg, not 'curves\.jpg'"):
        plot_curves(METRICS, tmp_path / "curves.jpg")


def test_tick_labels_are_round_numbers():
    figure = drawn(plot_series(SERIES, None, "training time (minutes)", "kNN top-1 (%)"))
    (axes,) = figure.axes
    for axis in (axes.xaxis, axes.yaxis):
        ticks = list(axis.get_majorticklocs())
        assert is_round(ticks)
        labels = [
            label.get_text().replace("\N{MINUS SIGN}", "-") for label in axis.get_ticklabels()
        ]
        assert all(len(label.partition(".")[2]) <= 1 for label in labels), labels  # 2.5, not 2.53
    assert axes.get_xlabel() == "training time (minutes)" and axes.get_ylabel() == "kNN top-1 (%)"


def test_curves_show_loss_against_step_and_the_monitors_knn_against_epoch():
    figure = drawn(plot_curves(METRICS, title="a run"))
    loss, knn = figure.axes
    assert (loss.get_xlabel(), knn.get_xlabel()) == ("step", "epoch")
    assert knn.get_ylabel() == "kNN top-1 (%)"
    (line,) = knn.get_lines()
    assert list(line.get_ydata()) == [
        r["knn_top1"] for r in METRICS if "epoch" in r and "knn_top1" in r
    ]
    steps = loss.xaxis.get_majorticklocs()
    assert all(float(s).is_integer() for s in steps) and is_round(steps)
    long_run = [{"step": s, "loss": 1 / s} for s in range(10, 100_001, 10)]
    assert is_round(drawn(plot_curves(long_run)).axes[0].xaxis.get_majorticklocs())
    assert figure.get_suptitle() == "a run"


def test_seeds_of_one_recipe_share_a_colour_and_one_legend_entry():
    figure = plot_series(
        SERIES, None, "minutes", "kNN", groups=GROUPS, thresholds={"collapse floor": 50.0}
    )
    (axes,) = figure.axes
    entries = [text.get_text() for text in axes.get_legend().get_texts()]
    assert entries == ["simclr", "byol", "collapse floor"]
    colours = [line.get_color() for line in axes.get_lines()[:3]]
    assert colours[0] == colours[1] != colours[2]


def test_stages_are_named_in_order_on_the_x_axis_and_each_run_is_in_the_legend():
    results = {
        "simclr": [(s, 80.0 + i) for i, s in enumerate(ORDER)],
        "supervised": [(s, 85.0 + i) for i, s in enumerate(ORDER[:5])],  # no projector
    }
    figure = drawn(plot_stages(results, ORDER, title="linear top-1 (%) per stage"))
    (axes,) = figure.axes
    assert [label.get_text() for label in axes.get_xticklabels()] == ORDER
    assert [text.get_text() for text in axes.get_legend().get_texts()] == list(results)
    assert list(axes.get_lines()[1].get_xdata()) == [0, 1, 2, 3, 4]


def test_a_chart_without_data_says_so():
    figure = plot_curves([])
    assert all("no data yet" in [t.get_text() for t in axes.texts] for axes in figure.axes)
