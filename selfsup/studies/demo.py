"""`selfsup demo`: pre-train a recipe within a wall-clock budget, then evaluate its features
and the raw pixels with the same kNN and linear probe (the README's first command)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from selfsup.config import Config, load_config
from selfsup.engine.log import format_duration
from selfsup.engine.train import train
from selfsup.eval.protocols import evaluate, pixel_baselines
from selfsup.run import Run

logger = logging.getLogger(__name__)

DEMO_RECIPE = "vicreg/fashion_mnist_20px"  # the choice: docs/benchmarks.md, "The demo recipe"
DEMO_MINUTES = 15.0
# Kept from the demo's budget for evaluating (kNN and linear probe of the features and of the raw
# pixels): about 1:10 on the faster and, estimated, 2:20 on the slower of the 2-core machines.
EVAL_RESERVE_MINUTES = 3.0


@dataclass
class DemoResult:
    config: Config  # as given, with the budget (the run's own config holds the chosen epochs)
    run: Run
    pixels: dict[str, Any]  # kNN and linear results of the raw pixels
    learned: dict[str, Any]  # ... and of the pre-trained encoder's features
    train_seconds: float
    eval_seconds: float


def pretraining_overrides(minutes: float, overrides: Sequence[str]) -> list[str]:
    """`overrides`, with the budget that leaves EVAL_RESERVE_MINUTES of `minutes` to evaluate
    unless they set the length themselves."""
    overrides = list(overrides)
    if not any(o.startswith(("train.epochs=", "train.budget_minutes=")) for o in overrides):
        if minutes <= EVAL_RESERVE_MINUTES:
            raise ValueError(
                f"--minutes {minutes:g} leaves no time to pre-train: evaluation keeps "
                f"{EVAL_RESERVE_MINUTES:g} minutes; give more, or set train.epochs"
            )
        overrides.append(f"train.budget_minutes={minutes - EVAL_RESERVE_MINUTES}")
    return overrides


def demo(
    recipe: str = DEMO_RECIPE, minutes: float = DEMO_MINUTES, overrides: Sequence[str] = ()
) -> DemoResult:
    """Pre-train `recipe` to fill `minutes` less the evaluation's reserve, then probe it and the
    raw pixels on the test split."""
    config = load_config(recipe, pretraining_overrides(minutes, overrides))
    began = time.perf_counter()
    run = train(config)
    trained = time.perf_counter()
    logger.info(
        f"pre-training took {format_duration(trained - began)}; evaluating on the test split"
    )
    learned = evaluate(run)
    pixels = pixel_baselines(config)
    return DemoResult(config, run, pixels, learned, trained - began, time.perf_counter() - trained)
