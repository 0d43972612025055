"""`selfsup` command line: parse, call one public function, print."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from selfsup.config import load_config, recipe_names, recipe_summary
from selfsup.engine.collapse import CollapseError
from selfsup.engine.log import format_duration
from selfsup.registry import METHODS

DEMO_RECIPE = "simclr/fashion_mnist"
DEMO_MINUTES = 15.0
# Kept from the demo's budget for evaluating (kNN and linear probe of the features and of the raw
# pixels): about 1:10 on the faster and, estimated, 2:20 on the slower of the 2-core machines.
EVAL_RESERVE_MINUTES = 3.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        FloatingPointError,
        CollapseError,
    ) as error:
        print(f"selfsup: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nselfsup: interrupted; the last checkpoint is kept (resume with --resume)",
            file=sys.stderr,
        )
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsup", description="Self-supervised visual representation learning."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe (any method or task), or resume a run")
    p.add_argument("recipe", nargs="?", help="recipe name (see `selfsup recipes`) or YAML path")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.1")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    p.set_defaults(func=_train)

    p = sub.add_parser("finetune", help="fine-tune a run's encoder with a new head on labels")
    p.add_argument("run_dir", help="the pre-trained run")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. method.freeze_to=layer3")
    p.add_argument("--recipe", help="fine-tuning recipe (default: finetune/<the run's dataset>)")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("eval", help="evaluate a run: its encoder (knn, linear), its classifier")
    p.add_argument("protocol", choices=["knn", "linear", "classify", "all"])
    p.add_argument("run_dir")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_eval)

    p = sub.add_parser("embed", help="write encoder features of images or a dataset to .npy")
    p.add_argument("run_dir")
    p.add_argument("images", help="a folder of images, or a dataset name[:split]")
    p.add_argument("-o", "--output", required=True, help="output .npy file")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_embed)

    p = sub.add_parser("export", help="write the encoder weights as a plain state dict")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", help="output file (default RUN_DIR/encoder.pt)")
    p.set_defaults(func=_export)

    p = sub.add_parser("recipes", help="list the recipes")
    p.set_defaults(func=_recipes)
    p = sub.add_parser("methods", help="list the methods")
    p.set_defaults(func=_methods)

    p = sub.add_parser(
        "compare", help="pre-train recipes at one time budget and tabulate their accuracies"
    )
    p.add_argument("recipes", nargs="+", help="recipe names or YAML paths (same data, backbone)")
    p.add_argument("--minutes", type=float, default=8.0, help="pre-training budget of each run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="for every recipe")
    p.add_argument("--out", default="runs/compare", help="runs, table and chart (reused)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("demo", help="pre-train, evaluate, and compare with raw-pixel baselines")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--recipe", default=DEMO_RECIPE)
    p.add_argument(
        "--minutes",
        type=float,
        default=DEMO_MINUTES,
        help=f"the whole demo's budget (default {DEMO_MINUTES:g}); pre-training gets all but "
        f"{EVAL_RESERVE_MINUTES:g} minutes kept for evaluation, unless train.epochs is given",
    )
    p.set_defaults(func=_demo)
    return parser


def _train(args: argparse.Namespace) -> int:
    from selfsup.engine.train import train

    if args.resume:
        overrides = ([args.recipe] if args.recipe else []) + args.overrides
        run = train(resume=args.resume, overrides=overrides)
    elif args.recipe:
        run = train(args.recipe, args.overrides)
    else:
        raise ValueError("give a recipe (see `selfsup recipes`) or --resume RUN_DIR")
    print(f"run folder: {run.path}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from selfsup.engine.train import finetune

    run = finetune(args.run_dir, args.overrides, args.recipe)
    print(f"run folder: {run.path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from selfsup.eval.protocols import CLASSIFY, PROTOCOLS, evaluate
    from selfsup.run import Run

    protocols = [args.protocol]
    if args.protocol == "all":  # and the classifier's own accuracy where there is one
        protocols = [
            *PROTOCOLS,
            *([CLASSIFY] if hasattr(Run(args.run_dir).method, "classify") else []),
        ]
    results = evaluate(args.run_dir, protocols, device=args.device)
    for key, value in results.items():
        shown = f"{value:g}" if key.endswith("weight_decay") else f"{value:6.2f}"
        print(f"{key:20s} {shown}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from selfsup.eval.protocols import embed

    array = embed(args.run_dir, args.images, args.output, device=args.device)
    print(f"wrote {args.output}: {array.shape[0]} x {array.shape[1]} float32")
    return 0


def _export(args: argparse.Namespace) -> int:
    from selfsup.eval.protocols import export

    print(f"wrote {export(args.run_dir, args.output)}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    for name in recipe_names():
        print(f"{name:28s} {recipe_summary(name)}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    import selfsup.methods  # noqa: F401  (registers the methods)

    for name in METHODS.names():
        print(f"{name:14s} {METHODS.summary(name)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from selfsup.compare import compare, markdown

    table = compare(args.recipes, args.minutes, args.seeds, args.set, args.out)
    print(markdown(table))
    print(f"\ntable: {args.out}/compare.md (.json); chart: {args.out}/compare.png")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from selfsup.engine.train import train
    from selfsup.eval.protocols import evaluate, pixel_baselines

    overrides = list(args.overrides)
    if not any(o.startswith(("train.epochs=", "train.budget_minutes=")) for o in overrides):
        if args.minutes <= EVAL_RESERVE_MINUTES:
            raise ValueError(
                f"--minutes {args.minutes:g} leaves no time to pre-train: evaluation keeps "
                f"{EVAL_RESERVE_MINUTES:g} minutes; give more, or set train.epochs"
            )
        overrides.append(f"train.budget_minutes={args.minutes - EVAL_RESERVE_MINUTES}")
    config = load_config(args.recipe, overrides)
    began = time.perf_counter()
    run = train(config)
    epochs = run.config.train.epochs
    trained = time.perf_counter()
    print(
        f"pre-training took {format_duration(trained - began)}; evaluating on the test split",
        file=sys.stderr,
    )
    learned = evaluate(run)
    pixels = pixel_baselines(config)
    done = time.perf_counter()
    backbone = ", ".join(f"{k}={v}" for k, v in config.backbone.items() if k != "name")
    k = config.eval.knn_k
    rows = [
        ("raw pixels", pixels),
        (f"{config.method['name']} + {config.backbone['name']} ({backbone})", learned),
    ]
    budget = config.train.budget_minutes
    chosen = (
        f" (chosen to fill {budget:g} minutes; replay: train.epochs={epochs!r})" if budget else ""
    )
    print(
        f"\n{config.data['name']} {config.eval.test_split} split, "
        f"{epochs:.3g} epochs of pre-training{chosen}"
    )
    print(f"{'features':44s} {f'kNN top-1 (k={k})':>18s} {'linear top-1':>13s}")
    for name, r in rows:
        print(f"{name:44s} {r['knn_top1']:18.2f} {r['linear_top1']:13.2f}")
    print(
        f"\ntime: pre-training {format_duration(trained - began)}, evaluation "
        f"{format_duration(done - trained)}; run folder: {run.path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
