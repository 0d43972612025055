"""Minutes of training each method needs to reach a kNN and a linear-probe mark, before and after.

    python benchmarks/time_to_accuracy.py --minutes 2 4 8 16 --seeds 0 --out runs/tta
    python benchmarks/time_to_accuracy.py --minutes 2 4 8 16 --out runs/tta \\
        barlow_twins:before=barlow_twins/fashion_mnist \\
        barlow_twins:after=barlow_twins/fashion_mnist_20px,optim.lr=0.4

An ENTRY is `METHOD:ARM=RECIPE[,override,...]` with ARM `before` or `after`; without entries the
before arm is every `<method>/fashion_mnist` of METHODS and the after arm the recipes of AFTER.
Each entry is pre-trained at every budget of --minutes in turn, smallest first, by `selfsup
compare` (selfsup/studies/compare.py: `train.budget_minutes`, the epochs chosen from measured
throughput so that the run ends at its budget; then kNN and the linear probe on the test split)
into <out>/<budget>min/<method>-<arm>/, and goes no further up the budgets once it has reached
both marks. Finished runs are reused, so a second call (or a longer --minutes) trains only what
is missing.

Minutes to a mark: the measured training minutes (metrics.jsonl's "seconds", which leave out
time the process was stopped; mean over seeds) of the smallest budget whose mean accuracy reaches
the mark; "> X" when the largest budget, X minutes, does not. The grid bounds the time from above:
a budget between that one and the one below it might reach the mark too.

<out>/time_to_accuracy.md, .json   the tables (the markdown pastes into docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from selfsup.config import load_config
from selfsup.studies.compare import compare
from selfsup.studies.runs import study_folder

METHODS = ["simclr", "moco_v2", "byol", "barlow_twins", "vicreg", "swav", "dino", "emp_ssl"]
# The after-recipes measured so far (a recipe with overrides, as an entry's spec); a method not here
# is reported as "no after-recipe yet". SimCLR's before-recipe already has 20 px views: its after
# is the other after-recipes' width-1/4 network, probed at 28 px.
AFTER = {
    "simclr": "simclr/fashion_mnist,backbone.width=0.25,views.image_size=28",
    "barlow_twins": "barlow_twins/fashion_mnist_20px",
    "vicreg": "vicreg/fashion_mnist_20px",
    "moco_v2": "moco_v2/fashion_mnist_20px",
    "swav": "swav/fashion_mnist_sharp",
}
ARMS = ("before", "after")
MARKS = {"knn": "knn_top1", "linear": "linear_top1"}
# An override starts with `key=`; commas inside a value (a list: views.scale=[0.2,1.0]) stay.
OVERRIDE_START = re.compile(r",(?=[\w.]+=)")


def default_entries() -> list[str]:
    before = [f"{m}:before={m}/fashion_mnist" for m in METHODS]
    return before + [f"{m}:after={recipe}" for m, recipe in AFTER.items()]


def parse_entry(text: str) -> dict[str, Any]:
    """`METHOD:ARM=RECIPE[,override,...]` as {label, method, arm, recipe, overrides}."""
    label, _, spec = text.partition("=")
    method, _, arm = label.partition(":")
    if not spec or not method or arm not in ARMS:
        raise ValueError(
            f"entry {text!r} is not METHOD:ARM=RECIPE[,override,...] with ARM before or after; "
            f"e.g. barlow_twins:after=barlow_twins/fashion_mnist_20px,optim.lr=0.4"
        )
    recipe, *overrides = OVERRIDE_START.split(spec)
    return {"label": label, "method": method, "arm": arm, "recipe": recipe, "overrides": overrides}


def reached(row: dict[str, Any], key: str, mark: float) -> bool:
    return not math.isnan(row[key]) and row[key] >= mark  # a collapsed run reaches nothing


def climb(
    entry: dict[str, Any],
    budgets: list[float],
    marks: dict[str, float],
    seeds: list[int],
    shared: list[str],
    out: Path,
) -> list[dict[str, Any]]:
    """The entry's compare row at each budget, smallest first, until both marks are reached."""
    rows = []
    folder_name = entry["label"].replace(":", "-")
    for budget in budgets:
        folder = out / f"{budget:g}min" / folder_name
        share_pixels(out, folder, before=True)
        table = compare(
            [entry["recipe"]], budget, seeds, [*shared, *entry["overrides"]], out=folder
        )
        share_pixels(out, folder, before=False)
        runs = [r["run"] for r in table["runs"]]
        rows.append({"budget": budget, **table["rows"][0], "runs": runs})
        if all(any(reached(r, MARKS[name], mark) for r in rows) for name, mark in marks.items()):
            break
    return rows


def share_pixels(out: Path, folder: Path, before: bool) -> None:
    """Compare computes the raw-pixel baselines once per folder (a minute on Fashion-MNIST): one
    copy in `out` serves every entry's folder (compare checks the data it was computed on)."""
    source, target = (out, folder) if before else (folder, out)
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.glob("pixels-*.json"):
        if not (target / path.name).exists():
            shutil.copyfile(path, target / path.name)


def time_to(rows: list[dict[str, Any]], key: str, mark: float) -> dict[str, Any]:
    """Training minutes of the first row that reaches `mark`; else those of the last row."""
    for row in rows:
        if reached(row, key, mark):
            return {"minutes": row["train_seconds"] / 60, "reached": True, "budget": row["budget"]}
    last = rows[-1]
    seconds = last["train_seconds"]
    minutes = seconds / 60 if not math.isnan(seconds) else last["budget"]
    return {"minutes": minutes, "reached": False, "budget": last["budget"]}


def verdict(before: dict | None, after: dict | None) -> tuple[str, bool | None, str]:
    """(after / before as text, whether after needs at most half the time, what limits it)."""
    if after is None:
        return "–", None, "no after-recipe yet"
    if before is None:
        return "–", None, "no before-recipe"
    ratio = after["minutes"] / before["minutes"]
    if before["reached"] and after["reached"]:
        half = ratio <= 0.5
        return f"{ratio:.2f}", half, "" if half else f"{ratio:.2f} of the before-time"
    if after["reached"]:  # before > its minutes: the ratio is below this one
        half = ratio <= 0.5
        limit = "" if half else f"before not reached within {before['minutes']:.1f} min"
        return f"< {ratio:.2f}", half or None, limit
    limit = f"after not reached within {after['minutes']:.1f} min"
    return (f"> {ratio:.2f}", False, limit) if before["reached"] else ("–", None, limit)


def summarise(
    entries: list[dict[str, Any]],
    results: dict[str, list[dict[str, Any]]],
    marks: dict[str, float],
) -> list[dict[str, Any]]:
    """One row per method: each arm's minutes to each mark, the ratio and the verdict."""
    methods = list(dict.fromkeys(e["method"] for e in entries))
    summary = []
    for method in methods:
        arms = {e["arm"]: e for e in entries if e["method"] == method}
        row: dict[str, Any] = {"method": method}
        for arm in ARMS:
            entry = arms.get(arm)
            row[arm] = entry and {
                "label": entry["label"],
                "recipe": " ".join([entry["recipe"], *entry["overrides"]]),
                **{
                    name: time_to(results[entry["label"]], MARKS[name], mark)
                    for name, mark in marks.items()
                },
            }
        limits, halves = [], []
        for name in marks:
            ratio, half, limit = verdict(
                row["before"] and row["before"][name], row["after"] and row["after"][name]
            )
            row[f"{name}_ratio"] = ratio
            halves.append(half)
            if limit and limit not in limits:
                limits.append(limit if limit == "no after-recipe yet" else f"{name}: {limit}")
        row["half"] = all(halves)
        row["verdict"] = "≤ 0.5: yes" if row["half"] else "; ".join(limits)
        summary.append(row)
    return summary


def minutes_text(result: dict[str, Any] | None) -> str:
    if result is None:
        return "–"
    return f"{result['minutes']:.1f}" if result["reached"] else f"> {result['minutes']:.1f}"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}


def markdown(report: dict[str, Any]) -> str:
    marks, budgets = report["marks"], report["budgets"]
    knn, linear = marks["knn"], marks["linear"]
    host = report["machine"]
    lines = [
        f"## Time to kNN {knn:g} and linear {linear:g}, before and after ({report['date']})",
        "",
        f"Machine: {host['cpu']}, {host['threads']} threads, torch {host['torch']}; "
        f"{report['reused']} of the {report['runs']} runs were made by an earlier call (one "
        f"sitting: 0, from an empty --out on an idle machine). Command:",
        "",
        f"    {report['command']}",
        "",
        f"Minutes of training (measured: the runs' training seconds, stopped time excluded; mean "
        f"over seeds {', '.join(map(str, report['seeds']))}) to reach kNN top-1 ≥ {knn:g} % and "
        f"linear top-1 ≥ {linear:g} % on the test split. Each entry is pre-trained at the budgets "
        f"{', '.join(f'{b:g}' for b in budgets)} min (`train.budget_minutes`, the schedules ending "
        f"with each) until it reaches both; a time is that of the smallest budget whose run "
        f"reaches the mark, so the grid bounds it from above (a budget between it and the one "
        f'below might reach it too); "> X": not reached by the largest budget, X its minutes.',
        "",
        f"| method | before | kNN {knn:g} | linear {linear:g} | after | kNN {knn:g} | "
        f"linear {linear:g} | after / before (kNN, linear) | after in ≤ half the time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["methods"]:
        cells = [row["method"]]
        for arm in ARMS:
            result = row[arm]
            cells += [result["recipe"] if result else "–"]
            cells += [minutes_text(result and result[name]) for name in marks]
        cells += [f"{row['knn_ratio']}, {row['linear_ratio']}", row["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy at each budget trained (a budget left out: the entry had reached both marks):",
        "",
        "| entry | budget (min) | epochs | training (min) | img/s | kNN top-1 | linear top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rows in report["results"].items():
        for r in rows:
            if r.get("collapsed", 0) == r["seeds"]:
                lines.append(f"| {label} | {r['budget']:g} | – | – | – | collapsed | collapsed |")
                continue
            note = f" ({r['collapsed']} of {r['seeds']} seeds collapsed)" if r["collapsed"] else ""
            lines.append(
                f"| {label} | {r['budget']:g} | {r['epochs']:.2f} | {r['train_seconds'] / 60:.1f} "
                f"| {r['img_per_s']:.0f} | {r['knn_top1']:.2f}{note} | {r['linear_top1']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "entries", nargs="*", metavar="ENTRY", help="METHOD:ARM=RECIPE[,override,...]"
    )
    parser.add_argument("--minutes", type=float, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--knn-mark", type=float, default=80.0, help="kNN top-1 to reach, in %%")
    parser.add_argument("--linear-mark", type=float, default=86.0, help="linear top-1, in %%")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every entry")
    parser.add_argument("--out", type=Path, default=Path("runs/tta"))
    args = parser.parse_args(argv)
    if any(not m > 0 for m in args.minutes):
        parser.error(f"--minutes must all be > 0, got {args.minutes}")
    budgets = sorted(set(args.minutes))
    try:
        entries = [parse_entry(text) for text in args.entries or default_entries()]
    except ValueError as error:
        parser.error(str(error))
    labels = [e["label"] for e in entries]
    if len(set(labels)) != len(labels):
        parser.error(f"each METHOD:ARM once, got {labels}")
    for e in entries:  # a wrong recipe or override stops here, not hours into the sitting
        load_config(e["recipe"], [*args.set, *e["overrides"]])
    marks = {"knn": args.knn_mark, "linear": args.linear_mark}
    with study_folder(args.out) as out:
        earlier = {p.parent.resolve() for p in out.glob("*min/*/*/config.yaml")}
        results = {e["label"]: climb(e, budgets, marks, args.seeds, args.set, out) for e in entries}
        runs = [Path(p).resolve() for rows in results.values() for r in rows for p in r["runs"]]
        report = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "command": shlex.join(
                [
                    "python",
                    "benchmarks/time_to_accuracy.py",
                    *(sys.argv[1:] if argv is None else argv),
                ]
            ),
            "budgets": budgets,
            "seeds": args.seeds,
            "marks": marks,
            "runs": len(runs),
            "reused": sum(p in earlier for p in runs),
            "entries": entries,
            "methods": summarise(entries, results, marks),
            "results": results,
        }
        text = markdown(report)
        (out / "time_to_accuracy.md").write_text(text + "\n")
        (out / "time_to_accuracy.json").write_text(json.dumps(report, indent=1))
    print(text)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
