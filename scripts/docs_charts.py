"""Redraw the docs' charts whose numbers are in the docs themselves (no run folder, no training).

The stage-wise probe charts docs/images/stages_digits.png and stages_fashion_mnist.png plot the
per-stage table of docs/evaluation.md ("Outcome on Fashion-MNIST → digits"): this script reads
that table and draws the charts as `selfsup stages ... --chart` did, with the same run labels and
titles. The compare charts (kNN monitor curves against training time) and the report screenshot
need the run folders, which are not kept: they stay as they were drawn.

    .venv/bin/python scripts/docs_charts.py
"""

from __future__ import annotations

from itertools import takewhile
from pathlib import Path

from selfsup.eval.stages import stage_order
from selfsup.plot import plot_stages

DOCS = Path(__file__).resolve().parent.parent / "docs"
TABLE_HEADER = "| stage | SimCLR, digits |"
# the table's columns, in order, as the run folders the docs' commands name
RUNS = ["simclr_fashion_mnist-seed0", "simclr-noproj", "supervised_fashion_mnist-seed0"]
CHARTS = {"digits": "stages_digits.png", "fashion_mnist": "stages_fashion_mnist.png"}


def stage_table(text: str) -> dict[str, dict[str, list[dict[str, float | str]]]]:
    """{data: {run: [{"stage", "linear_top1"}, ...]}} from the markdown table: three digits
    columns then three Fashion-MNIST columns; "layer4 = encoder" is both stages, "–" none."""
    lines = text[text.index(TABLE_HEADER) :].splitlines()[2:]  # after the header and |---|
    rows = list(takewhile(lambda line: line.startswith("|"), lines))
    results: dict[str, dict[str, list[dict[str, float | str]]]] = {
        data: {run: [] for run in RUNS} for data in CHARTS
    }
    for row in rows:
        stage, *cells = [cell.strip().strip("*") for cell in row.strip().strip("|").split("|")]
        if len(cells) != 2 * len(RUNS):
            raise ValueError(f"docs/evaluation.md: expected {2 * len(RUNS)} values in: {row}")
        for column, cell in enumerate(cells):
            if cell in ("–", "-"):
                continue
            data, run = list(CHARTS)[column // len(RUNS)], RUNS[column % len(RUNS)]
            for name in stage.split(" = "):
                results[data][run].append({"stage": name, "linear_top1": float(cell)})
    return results


def main() -> None:
    results = stage_table((DOCS / "evaluation.md").read_text())
    for data, runs in results.items():
        lines = {run: [(r["stage"], r["linear_top1"]) for r in rows] for run, rows in runs.items()}
        where = f" on {data}" if data != "fashion_mnist" else ""  # as `selfsup stages --data`
        ylabel = "linear top-1 (%)"
        path = DOCS / "images" / CHARTS[data]
        plot_stages(lines, stage_order(runs), path, ylabel, f"{ylabel} per stage{where}")
        print(path)


if __name__ == "__main__":
    main()
