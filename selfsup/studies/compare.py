"""`selfsup compare`: recipes pre-trained at one wall-clock budget on the same data and backbone,
each evaluated by kNN and the linear probe, with raw pixels beside them.

A CPU user buys time, so every run gets the same minutes (`train.budget_minutes`: the engine
measures its throughput and sets the epochs that fill them) and the chart puts every run's kNN
monitor against its training time: which method learns fastest on this machine. Seeds give mean
and spread. Each (recipe, seed) is a run folder under `out`; a finished and evaluated one is
reused, an interrupted one is resumed from its checkpoint, so a long table can be built over
several sittings.

<out>/<recipe>-seed<k>/   the run folders (eval.json once evaluated)
<out>/pixels-<data>.json  the raw-pixel baselines
<out>/compare.md, .json   the table of the last call; compare.png its kNN-against-time chart
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup.config import Config, load_config
from selfsup.engine.log import format_duration
from selfsup.eval.protocols import pixel_baselines
from selfsup.plot import plot_series
from selfsup.studies.runs import (
    ACCURACIES,
    collapsed_row,
    probed,
    slug,
    study_folder,
    trained,
)

logger = logging.getLogger(__name__)

# What must be equal in every compared recipe: the comparison is of methods, not of data or
# encoders. Views may differ (they are part of a method's recipe) and so may the optimiser.
SHARED = ("data", "backbone")


def compare(
    recipes: Sequence[str],
    minutes: float,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    out: str | Path = "runs/compare",
) -> dict[str, Any]:
    """Pre-train every recipe for `minutes` with each seed (reusing finished runs), evaluate,
    and write the table (markdown and JSON) and the kNN-against-time chart into `out`."""
    if not recipes:
        raise ValueError("compare needs at least one recipe (see `selfsup recipes`)")
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers, got {list(seeds)}")
    configs = {recipe: load_config(recipe, list(overrides)) for recipe in dict.fromkeys(recipes)}
    _check_shared(configs)
    with study_folder(out) as out:
        jobs = [(recipe, seed) for recipe in configs for seed in seeds]
        runs = []
        for number, (recipe, seed) in enumerate(jobs, 1):
            logger.info(f"[{number}/{len(jobs)}] {recipe} seed {seed}")
            runs.append(_run(configs[recipe], recipe, seed, minutes, out))
        first = next(iter(configs.values()))
        pixels = _pixels(first, out)
        table = {
            "minutes": minutes,
            "seeds": list(seeds),
            "overrides": list(overrides),
            "data": first.data,
            "backbone": first.backbone,
            "rows": [
                _summary(recipe, [r for r in runs if r["recipe"] == recipe]) for recipe in configs
            ],
            "pixels": pixels,
            "runs": runs,
        }
        (out / "compare.json").write_text(json.dumps(table, indent=1))
        (out / "compare.md").write_text(markdown(table) + "\n")
        _chart(runs, out / "compare.png", minutes)
    return table


def _check_shared(configs: dict[str, Config]) -> None:
    for section in SHARED:
        values = {recipe: getattr(config, section) for recipe, config in configs.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            listed = "\n".join(f"  {recipe}: {value}" for recipe, value in values.items())
            raise ValueError(
                f"compare runs every recipe on the same {section}, and these differ:\n{listed}\n"
                f"make them equal with --set {section}.<key>=<value> (applies to every recipe)"
            )


def _run(config: Config, recipe: str, seed: int, minutes: float, out: Path) -> dict[str, Any]:
    """One (recipe, seed): trained for `minutes` (or resumed, or reused) and evaluated."""
    name = f"{slug(recipe)}-seed{seed}"
    wanted = config.replace([f"train.seed={seed}", f"train.budget_minutes={minutes}"])
    run = trained(wanted, out / name, minutes)
    collapsed = collapsed_row(run, (*ACCURACIES, "img_per_s"))
    if collapsed is not None:
        epochs = run.epochs
        return {"recipe": recipe, "seed": seed, "epochs": epochs, "knn_curve": [], **collapsed}
    results = probed(run)
    metrics = run.metrics
    timed = [r for r in metrics if "seconds" in r]
    seconds = timed[-1]["seconds"] if timed else float("nan")
    steps = max((r["step"] for r in metrics if "loss" in r), default=0)
    images = steps * run.config.optim.batch_size
    return {
        "recipe": recipe,
        "seed": seed,
        "run": str(run.path),
        "epochs": run.epochs,
        "train_seconds": seconds,
        "img_per_s": images / seconds if seconds > 0 else float("nan"),
        "knn_curve": [(r["seconds"], r["knn_top1"]) for r in timed if "knn_top1" in r],
        **{key: results[key] for key in ACCURACIES},
    }


def _pixels(config: Config, out: Path) -> dict[str, float]:
    """Raw-pixel kNN and linear probe on the compared data, computed once per data set."""
    key = json.dumps(config.data, sort_keys=True)
    path = out / f"pixels-{config.data['name']}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("data") == key:
            return stored["results"]
    logger.info("raw-pixel baselines")
    results = pixel_baselines(config)
    path.write_text(json.dumps({"data": key, "results": results}, indent=1))
    return results


def _summary(recipe: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (over several seeds) sample standard deviation of each number of a recipe."""
    healthy = [r for r in runs if "collapsed_at_step" not in r]
    row: dict[str, Any] = {
        "recipe": recipe,
        "seeds": len(runs),
        "collapsed": len(runs) - len(healthy),
    }
    for key in ("img_per_s", "epochs", "train_seconds", *ACCURACIES):
        values = [r[key] for r in healthy]  # a collapsed run counts as collapsed, not as a number
        row[key] = statistics.fmean(values) if values else float("nan")
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    return row


def markdown(table: dict[str, Any]) -> str:
    """The comparison as a markdown table: one row per recipe, raw pixels last."""
    seeds = table["seeds"]
    spread = " (mean ± std over seeds)" if len(seeds) > 1 else ""
    backbone = ", ".join(f"{k}={v}" for k, v in table["backbone"].items())
    lines = [
        f"{table['data']['name']}, {backbone}; {table['minutes']:g} minutes of pre-training each, "
        f"seeds {', '.join(map(str, seeds))}{spread}",
        "",
        "| recipe | img/s | epochs | training time | kNN top-1 | linear top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        if row.get("collapsed", 0) == row["seeds"]:
            lines.append(f"| {row['recipe']} | – | – | – | collapsed | collapsed |")
            continue
        lines.append(
            f"| {row['recipe']} | {row['img_per_s']:.0f} | {row['epochs']:.2f} | "
            f"{format_duration(row['train_seconds'])} | {_number(row, 'knn_top1')} | "
            f"{_number(row, 'linear_top1')} |"
        )
    pixels = table["pixels"]
    lines.append(
        f"| raw pixels | – | – | – | {pixels['knn_top1']:.2f} | {pixels['linear_top1']:.2f} |"
    )
    return "\n".join(lines)


def _number(row: dict[str, Any], key: str) -> str:
    collapsed = row.get("collapsed", 0)
    std = row.get(f"{key}_std")
    text = f"{row[key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return text + (f" ({collapsed} of {row['seeds']} seeds collapsed)" if collapsed else "")


def _chart(runs: list[dict[str, Any]], path: Path, minutes: float) -> None:
    series = {
        f"{r['recipe']} seed {r['seed']}": [(s / 60, acc) for s, acc in r["knn_curve"]]
        for r in runs
    }
    plot_series(
        series,
        path,
        "training time (minutes)",
        "kNN top-1 (%)",
        title=f"kNN monitor against training time, {minutes:g} minutes of pre-training each",
        groups={f"{r['recipe']} seed {r['seed']}": r["recipe"] for r in runs},
    )
