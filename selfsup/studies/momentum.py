"""`selfsup momentum`: the momentum-encoder experiment of Tao et al. 2022 ("Exploring the
Equivalence of Siamese Self-Supervised Learning via A Unified Gradient Framework", arXiv
2112.05141, Table 2).

The paper's claim: the families differ little once their gradients are written as −v⁺ + λ·(negative
gradient); what moves accuracy is the target branch. Each family is trained twice, with a
stop-gradient target (the online network, detached) and with a momentum target (an EMA of it),
everything else equal; its official README (ImageNet, ResNet-50, 100 epochs, linear probe) lists
a gain of 2.2-2.4 points for every family, e.g. SimCLR 67.6 → 70.0, BYOL 67.9 → 70.2, Barlow Twins
67.6 → 70.0.

Here every recipe is trained with `train.target=stop_gradient` and `train.target=momentum` (the
switch of selfsup/target.py) for the same epochs (the paper's protocol: the momentum network's
extra forward is not charged) or the same minutes, probed by kNN and the linear probe
(eval/protocols.py), and its last checkpoint's gradient decomposed (eval/gradients.py: the
balance |negative|/|positive| and the cosine of the step with −v⁺) so the accuracy change stands
next to the change of the gradient. As in `selfsup compare`, a finished run is reused and an
interrupted one resumed.

<out>/<recipe>-<arm>-seed<k>/   the runs (eval.json, gradients.json once measured)
<out>/momentum.md, .json        the table of the last call
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup.config import Config, load_config, target_settings
from selfsup.eval.gradients import gradient_decomposition
from selfsup.methods import with_gradient_terms
from selfsup.studies.runs import (
    ACCURACIES,
    collapsed_row,
    describe_length,
    length_overrides,
    probed,
    slug,
    study_folder,
    trained,
)

logger = logging.getLogger(__name__)

ARMS = ("stop_gradient", "momentum")
GRADIENT_KEYS = ("balance", "cos_total_target")  # per arm in the table; all of them in the JSON


def momentum_experiment(
    recipes: Sequence[str],
    epochs: float | None = None,
    minutes: float | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
    out: str | Path = "runs/momentum",
    batches: int = 4,
    device: str = "auto",
) -> dict[str, Any]:
    """Train each recipe with a stop-gradient and with a momentum target for `epochs` (or
    `minutes`; neither: the recipe's own epochs), probe both and decompose their gradients
    (`batches` seeded batches), and write momentum.md and momentum.json into `out`."""
    if not recipes:
        raise ValueError("momentum needs at least one recipe, e.g. simclr/fashion_mnist")
    lengths = length_overrides(epochs, minutes)
    if batches < 1:
        raise ValueError(f"--batches must be >= 1, got {batches}")
    configs = {recipe: _checked(recipe, overrides) for recipe in dict.fromkeys(recipes)}
    with study_folder(out) as out:
        rows = []
        for number, (recipe, config) in enumerate(configs.items(), 1):
            row: dict[str, Any] = {"recipe": recipe, "method": config.method["name"]}
            for arm in ARMS:
                logger.info(f"[{number}/{len(configs)}] {recipe}: train.target={arm}")
                wanted = config.replace([f"train.target={arm}", f"train.seed={seed}", *lengths])
                run = trained(wanted, out / f"{slug(recipe)}-{arm}-seed{seed}", minutes)
                row[arm] = _measured(run, batches, device)
            rows.append(row)
        table = {
            "epochs": epochs,
            "minutes": minutes,
            "seed": seed,
            "overrides": list(overrides),
            "rows": rows,
        }
        (out / "momentum.json").write_text(json.dumps(table, indent=1))
        (out / "momentum.md").write_text(markdown(table) + "\n")
    return table


def _checked(recipe: str, overrides: Sequence[str]) -> Config:
    """The recipe's config; an error unless its method has both arms and a decomposition."""
    config = load_config(recipe, list(overrides))
    if any(item.split("=", 1)[0].strip() == "train.target" for item in overrides):
        raise ValueError("the experiment sets train.target itself; remove it from --set")
    name = config.method["name"]
    if not set(ARMS) <= set(target_settings(name)) or name not in with_gradient_terms():
        usable = [m for m in with_gradient_terms() if set(ARMS) <= set(target_settings(m))]
        raise ValueError(
            f"recipe {recipe} trains method '{name}', which has no stop-gradient/momentum "
            f"switch with a gradient decomposition; methods that have both: {', '.join(usable)}"
        )
    return config


def _measured(run: Any, batches: int, device: str) -> dict[str, Any]:
    """kNN and linear top-1 and the gradient scalars of a run, read back where measured."""
    row: dict[str, Any] = {"run": str(run.path), "epochs": run.epochs}
    collapsed = collapsed_row(run, (*ACCURACIES, *GRADIENT_KEYS))
    if collapsed is not None:
        return {**row, **collapsed}
    results = probed(run, device)
    path = run.path / "gradients.json"
    gradients = json.loads(path.read_text()) if path.is_file() else {}
    if gradients.get("batches") != batches:
        gradients = gradient_decomposition(run, batches, device)
    scalars = {k: v for k, v in gradients.items() if isinstance(v, float)}
    return {**row, **{key: results[key] for key in ACCURACIES}, "gradients": scalars}


def markdown(table: dict[str, Any]) -> str:
    """One row per recipe: both arms' kNN and linear top-1 and the change, then the gradient
    balance and the cosine of the step with the pull to the target."""
    how_long = describe_length(table["epochs"], table["minutes"])
    head = ["recipe", "epochs"]
    for key in ACCURACIES:
        name = key.removesuffix("_top1").replace("knn", "kNN")
        head += [f"{name} stop-grad", f"{name} momentum", f"{name} Δ"]
    head += [f"{key} {arm}" for key in GRADIENT_KEYS for arm in ("stop-grad", "momentum")]
    lines = [
        f"Each recipe with train.target=stop_gradient and =momentum ({how_long}, seed "
        f"{table['seed']}{', --set ' + ' '.join(table['overrides']) if table['overrides'] else ''}"
        f"). Top-1 %; balance = |negative| / |positive gradient|, cos_total_target = cos(step, "
        f"−v⁺), on the last checkpoint.",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for row in table["rows"]:
        sg, mom = row["stop_gradient"], row["momentum"]
        cells = [row["recipe"], _epochs(sg["epochs"], mom["epochs"])]
        for key in ACCURACIES:
            cells += [_number(sg, key), _number(mom, key), _change(sg, mom, key)]
        for key in GRADIENT_KEYS:
            cells += [f"{arm.get('gradients', {}).get(key, math.nan):.3f}" for arm in (sg, mom)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _epochs(first: float, second: float) -> str:
    return f"{first:.2f}" if math.isclose(first, second) else f"{first:.2f} / {second:.2f}"


def _number(arm: dict[str, Any], key: str) -> str:
    return "collapsed" if "collapsed_at_step" in arm else f"{arm[key]:.2f}"


def _change(first: dict[str, Any], second: dict[str, Any], key: str) -> str:
    if "collapsed_at_step" in first or "collapsed_at_step" in second:
        return "–"
    return f"{second[key] - first[key]:+.2f}"
