"""Methods compared at one wall-clock budget: pre-train each recipe for the same minutes, evaluate.

    python benchmarks/budget.py --minutes 15 simclr/fashion_mnist moco_v2/fashion_mnist \\
        byol/fashion_mnist simsiam/fashion_mnist

Each recipe trains with `train.budget_minutes`: the engine measures its throughput on the first
steps, sets the epochs so that pre-training (with its kNN monitor) fills the budget, and the LR
schedule runs to its end within it. The run is then evaluated
by kNN and the linear probe on the test split, like `selfsup demo`. The table gives the measured
pre-training time next to the budget, and the raw-pixel baselines by the same protocols.
Everything else is the recipe's own; `--set` overrides apply to every recipe.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from selfsup.config import load_config
from selfsup.engine.log import format_duration
from selfsup.engine.train import train
from selfsup.eval.protocols import evaluate, pixel_baselines


def run_one(recipe: str, overrides: list[str], minutes: float, out: Path) -> dict:
    config = load_config(recipe, overrides)
    name = recipe.replace("/", "_")
    began = time.perf_counter()
    run = train(
        config.replace(
            [
                f"train.budget_minutes={minutes}",
                f"train.out_dir={out}",
                f"train.name={name}",
                "train.progress=false",
            ]
        )
    )
    seconds = time.perf_counter() - began
    results = evaluate(run)
    return {
        "recipe": recipe,
        "epochs": run.config.train.epochs,
        "pretrain_seconds": seconds,
        "run": str(run.path),
        **results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--minutes", type=float, default=15.0, help="pre-training budget")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every recipe")
    parser.add_argument("--out", type=Path, default=Path("runs/budget"))
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, budget {args.minutes:g} min"
    )
    rows = [run_one(r, args.set, args.minutes, args.out) for r in args.recipes]
    first = load_config(args.recipes[0], args.set)
    pixels = pixel_baselines(first)
    (args.out / "budget.json").write_text(json.dumps({"rows": rows, "pixels": pixels}, indent=1))
    k = first.eval.knn_k
    print(f"\n| recipe | epochs | pre-training | kNN top-1 (k={k}) | linear top-1 (penalty) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['epochs']:.3g} | {format_duration(r['pretrain_seconds'])} | "
            f"{r['knn_top1']:.2f} | {_linear(r)} |"
        )
    print(f"| raw pixels | – | – | {pixels['knn_top1']:.2f} | {_linear(pixels)} |")


def _linear(result: dict) -> str:
    penalty = result.get("linear_weight_decay")
    return f"{result['linear_top1']:.2f}" + (f" ({penalty:g})" if penalty is not None else "")


if __name__ == "__main__":
    main()
