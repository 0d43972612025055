"""`selfsup gap`: the semantic-gap study, how the size of the pre-training data drives transfer
to classes never seen in pre-training, self-supervised against supervised.

Wang et al. 2022 ("Revisiting the Transferability of Supervised Pretraining: an MLP
Perspective", CVPR 2022, arXiv 2112.00496) split ImageNet's classes into a pre-training set
"pre-D" and a semantically distant evaluation set "eval-D". The claim tested here (stated for
that setting; the figures are not quoted from the paper): from 0.1 M to 1 M pre-training images,
eval-D accuracy of unsupervised pre-training grows by 25 %, of supervised pre-training (which fits
its labels) by 10 %.

Here the classes of one labelled dataset are split the same way: pre-D = `pre_classes`, eval-D =
all the others. For each size s the recipe is pre-trained on the class-balanced fraction s of
pre-D's training images (data.classes, data.fraction: selfsup/data/selection.py; a smaller
size's images lie inside a larger one's), and a supervised baseline with the same backbone on the
same images. Every frozen encoder is probed (kNN and linear: selfsup/eval/protocols.py) on
eval-D's train and test splits, and on pre-D's for reference (in-domain); both probes use all of
those classes' labelled images, so the rows differ only in the pre-training data. As in `selfsup
compare`, a finished run is reused and an interrupted one resumed.

<out>/<recipe>-size<s>-seed<k>/       the self-supervised runs (eval.json once probed)
<out>/<supervised>-size<s>-seed<k>/   the supervised baselines
<out>/gap.md, gap.json                the table of the last call
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup.build import load_data
from selfsup.config import (
    Config,
    apply_overrides,
    load_config,
    load_recipe,
    recipe_names,
    resolve,
)
from selfsup.data.selection import SELECTION_KEYS, describe
from selfsup.eval.protocols import PROTOCOLS, evaluate, stored_results
from selfsup.registry import METHODS
from selfsup.run import Run
from selfsup.studies.runs import (
    collapsed_row,
    describe_length,
    length_overrides,
    slug,
    study_folder,
    trained,
)

logger = logging.getLogger(__name__)

# The sections of --set that the supervised baseline takes too (its data, backbone, batch size
# and probe image size are the recipe's, already overridden); method, views and the rest of
# optim belong to each recipe.
SHARED_SECTIONS = ("train", "eval")


def split_classes(pre_classes: Sequence[int], num_classes: int) -> tuple[list[int], list[int]]:
    """(pre-D, eval-D): the given class ids, and every other id of 0..num_classes-1 in order."""
    pre = list(pre_classes)
    if not pre:
        raise ValueError("--pre-classes is empty: give the class ids of pre-D, e.g. 0,1,2,3,4")
    outside = [c for c in pre if not 0 <= c < num_classes]
    if outside:
        raise ValueError(
            f"--pre-classes {outside} are outside the dataset's classes 0..{num_classes - 1}; "
            f"give ids in that range"
        )
    if len(set(pre)) < len(pre):
        raise ValueError(f"--pre-classes names a class twice: {pre}")
    if len(pre) == num_classes:
        raise ValueError(
            f"--pre-classes are all {num_classes} classes, which leaves none for eval-D; give a "
            f"strict subset"
        )
    return pre, [c for c in range(num_classes) if c not in pre]


def semantic_gap(
    recipe: str,
    pre_classes: Sequence[int],
    sizes: Sequence[float] = (0.1, 0.3, 1.0),
    epochs: float | None = None,
    minutes: float | None = None,
    seed: int = 0,
    supervised: str | None = None,
    overrides: Sequence[str] = (),
    out: str | Path = "runs/gap",
    device: str = "auto",
) -> dict[str, Any]:
    """Pre-train `recipe` and the `supervised` recipe (default supervised/<dataset>) on pre-D =
    `pre_classes` at each of `sizes` (fractions of pre-D's training images) for `epochs` or
    `minutes` each (neither: the recipes' own epochs), probe every encoder on eval-D (the other
    classes) and pre-D, and write the table (gap.md, gap.json) into `out`. `overrides` apply to
    `recipe`, and their train.* and eval.* keys to the supervised baseline too."""
    lengths = length_overrides(epochs, minutes)
    sizes = _check_sizes(sizes)
    config = load_config(recipe, list(overrides))
    chosen = [key for key in SELECTION_KEYS if key in config.data]
    if chosen:
        raise ValueError(
            f"the study sets data.{' and data.'.join(chosen)} itself (--pre-classes, --sizes); "
            f"remove {', '.join(f'data.{key}' for key in chosen)} from the recipe and --set"
        )
    test = load_data(config, config.eval.test_split)
    if test.num_classes is None:
        raise ValueError(
            f"dataset '{config.data['name']}' has no labels to split into pre-D and eval-D; "
            f"choose a labelled dataset"
        )
    pre, eval_d = split_classes(pre_classes, test.num_classes)
    if supervised is None:
        supervised = f"supervised/{config.data['name']}"
        if supervised not in recipe_names():
            raise FileNotFoundError(
                f"no supervised recipe for dataset '{config.data['name']}' ({supervised}); give "
                f"one with --supervised, e.g. supervised/fashion_mnist (the study gives it this "
                f"recipe's data, backbone and batch size)"
            )
    baseline = _supervised_config(config, supervised, overrides)
    with study_folder(out) as out:
        rows = []
        for number, size in enumerate(sizes, 1):
            data = [f"data.classes={pre}", *([f"data.fraction={size}"] if size < 1 else [])]
            row: dict[str, Any] = {"size": size}
            for role, name, base in (("ssl", recipe, config), ("supervised", supervised, baseline)):
                logger.info(f"[{number}/{len(sizes)}] size {size:g}: {name}")
                wanted = base.replace([*data, f"train.seed={seed}", *lengths])
                run = trained(wanted, out / f"{slug(name)}-size{size:g}-seed{seed}", minutes)
                row["images"] = run.info["train_size"]  # the same images for both: same data, seed
                row[role] = _probed(run, config.data, {"eval": eval_d, "pre": pre}, device)
            rows.append(row)
        names = test.classes or [str(c) for c in range(test.num_classes)]
        table = {
            "recipe": recipe,
            "supervised": supervised,
            "data": config.data,
            "backbone": config.backbone,
            "pre_classes": pre,
            "eval_classes": eval_d,
            "pre_names": [names[c] for c in pre],
            "eval_names": [names[c] for c in eval_d],
            "seed": seed,
            "epochs": epochs,
            "minutes": minutes,
            "overrides": list(overrides),
            "rows": rows,
            "gain": _gain(rows),
        }
        (out / "gap.json").write_text(json.dumps(table, indent=1))
        (out / "gap.md").write_text(markdown(table) + "\n")
    return table


def _check_sizes(sizes: Sequence[float]) -> list[float]:
    sizes = [float(s) for s in sizes]
    if not sizes or len(set(sizes)) < len(sizes):
        raise ValueError(f"--sizes must be distinct fractions of pre-D, got {sizes}")
    bad = [s for s in sizes if not 0 < s <= 1]
    if bad:
        raise ValueError(
            f"--sizes are fractions of pre-D's training images, in (0, 1]; got {bad} "
            f"(e.g. --sizes 0.1 0.3 1)"
        )
    return sorted(sizes)


def _supervised_config(config: Config, recipe: str, overrides: Sequence[str]) -> Config:
    """The supervised recipe with the data and backbone of `config` (the same encoder on the
    same images), its batch size (the same steps at every length in epochs), its image size for
    the probes (whole images at the views' `image_size`, else their `size`: the same pixels
    probed) and the train.* and eval.* overrides."""
    raw = load_recipe(recipe)
    raw["data"], raw["backbone"] = config.data, config.backbone
    raw["optim"] = {**raw.get("optim", {}), "batch_size": config.optim.batch_size}
    probe_size = config.views.get("image_size") or config.views.get("size")
    views = raw.get("views", {})
    if probe_size and probe_size != (views.get("image_size") or views.get("size")):
        raw["views"] = {**views, "image_size": probe_size}
    shared = [item for item in overrides if item.split(".", 1)[0] in SHARED_SECTIONS]
    baseline = resolve(apply_overrides(raw, shared))
    method = baseline.method["name"]
    if not getattr(METHODS.get(method), "uses_labels", False):
        raise ValueError(
            f"--supervised {recipe} trains method '{method}', which uses no labels; give a "
            f"supervised recipe (e.g. supervised/fashion_mnist)"
        )
    return baseline


def _probed(
    run: Run, data: dict[str, Any], parts: dict[str, list[int]], device: str
) -> dict[str, Any]:
    """kNN and linear top-1 of the run's frozen encoder on each part's classes (their own train
    and test splits), read from <run>/eval.json where already measured."""
    collapsed = collapsed_row(run, [f"{part}_{p}_top1" for part in parts for p in PROTOCOLS])
    if collapsed is not None:
        return collapsed
    stored = stored_results(run)
    results: dict[str, Any] = {"run": str(run.path)}
    for part, classes in parts.items():
        spec = {**data, "classes": classes}
        keys = {p: f"{describe(spec)}/{p}_top1" for p in PROTOCOLS}
        if not set(keys.values()) <= set(stored):
            stored.update(evaluate(run, PROTOCOLS, device, data=spec))
        results.update({f"{part}_{p}_top1": stored[key] for p, key in keys.items()})
    return results


def _gain(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The change of eval-D linear top-1 from the smallest to the largest size, in points and
    relative to the smallest: the claim's +25 % (self-supervised) against +10 % (supervised)."""
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    gain: dict[str, Any] = {"from": first["size"], "to": last["size"]}
    for role in ("ssl", "supervised"):
        before, after = first[role]["eval_linear_top1"], last[role]["eval_linear_top1"]
        gain[role] = {
            "points": after - before,
            "relative_percent": 100 * (after - before) / before if before > 0 else math.nan,
        }
    return gain


COLUMNS = [
    ("SSL eval-D kNN", "ssl", "eval_knn_top1"),
    ("SSL eval-D linear", "ssl", "eval_linear_top1"),
    ("supervised eval-D kNN", "supervised", "eval_knn_top1"),
    ("supervised eval-D linear", "supervised", "eval_linear_top1"),
    ("SSL pre-D linear", "ssl", "pre_linear_top1"),
    ("supervised pre-D linear", "supervised", "pre_linear_top1"),
]


def markdown(table: dict[str, Any]) -> str:
    """The study as a markdown table: one row per pre-D size, top-1 in %."""
    how_long = describe_length(table["epochs"], table["minutes"])
    backbone = ", ".join(f"{k}={v}" for k, v in table["backbone"].items())

    def listed(ids: list[int], names: list[str]) -> str:
        pairs = zip(ids, names, strict=True)
        return ", ".join(f"{c} ({name})" if name != str(c) else str(c) for c, name in pairs)

    lines = [
        f"{table['recipe']} and {table['supervised']} ({backbone}), pre-trained on pre-D = "
        f"{table['data']['name']} classes {listed(table['pre_classes'], table['pre_names'])} at "
        f"each size ({how_long}, seed {table['seed']}); probed on eval-D = classes "
        f"{listed(table['eval_classes'], table['eval_names'])}. Top-1 %.",
        "",
        "| pre-D size | pre-D images | " + " | ".join(title for title, _, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in table["rows"]:
        cells = [
            "collapsed" if "collapsed_at_step" in row[role] else f"{row[role][key]:.2f}"
            for _, role, key in COLUMNS
        ]
        lines.append(f"| {row['size']:g} | {row['images']} | " + " | ".join(cells) + " |")
    gain = table["gain"]
    if gain is not None:
        parts = [
            f"{title} {gain[role]['points']:+.2f} points ({gain[role]['relative_percent']:+.1f} %)"
            for title, role in (("self-supervised", "ssl"), ("supervised", "supervised"))
        ]
        lines += [
            "",
            f"eval-D linear from size {gain['from']:g} to {gain['to']:g}: " + ", ".join(parts),
        ]
    return "\n".join(lines)
