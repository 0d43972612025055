"""`selfsup` command line: parse, call one public function, print."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from selfsup.config import recipe_names, recipe_summary
from selfsup.engine.collapse import CollapseError
from selfsup.engine.log import format_duration
from selfsup.files import output_file
from selfsup.registry import METHODS
from selfsup.studies.demo import DEMO_MINUTES, DEMO_RECIPE, EVAL_RESERVE_MINUTES


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _log_to_stderr()
    try:
        status = args.func(args)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at exit
        return status
    except BrokenPipeError:
        # the reader went away (`selfsup recipes | head`): end as cat or grep do, killed by
        # SIGPIPE (status 128 + 13, which `set -o pipefail` sees as a cut-short writer), quietly.
        # stdout now points at devnull, so Python's final flush at exit raises nothing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        FloatingPointError,
        CollapseError,
        ModuleNotFoundError,  # an optional extra's library, named with its pip install line
    ) as error:
        print(f"selfsup: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nselfsup: interrupted; the last checkpoint is kept (resume with --resume)",
            file=sys.stderr,
        )
        return 130


class _Stderr(logging.StreamHandler):
    """A handler that writes to the sys.stderr of the moment (a redirection, a test's capture)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _log_to_stderr() -> None:
    """The package's log lines (the "selfsup" logger, INFO and up) on stderr, one message a line:
    once, and only where nobody has given that logger a handler yet."""
    logger = logging.getLogger("selfsup")
    if logger.handlers:
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


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
    p.add_argument(
        "overrides", nargs="*", help="eval.key=value for this evaluation, e.g. eval.knn_k=20"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--data", metavar="NAME", help="transfer: probe on this dataset's train/test (e.g. digits)"
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser("embed", help="write encoder features of images or a dataset to .npy")
    p.add_argument("run_dir")
    p.add_argument("images", help="a folder of images, or a dataset name[:split]")
    p.add_argument("-o", "--output", required=True, help="output .npy file, or a folder for it")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_embed)

    p = sub.add_parser(
        "export", help="write the encoder as a plain state dict, or as an ONNX model"
    )
    p.add_argument("run_dir")
    p.add_argument(
        "-o", "--output", help="output file or folder (default RUN_DIR/encoder.pt or encoder.onnx)"
    )
    p.add_argument(
        "--format",
        choices=["state_dict", "onnx"],
        default="state_dict",
        help="state_dict: weights, torchvision/timm names (default); onnx: the encoder with the "
        "run's normalisation, input images in [0, 1], dynamic batch (pip install 'selfsup[onnx]')",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser("neighbours", help="nearest images of query images by a run's encoder")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files or folders")
    p.add_argument(
        "--gallery", help="a folder of images or a dataset name[:split] (default: the run's own)"
    )
    p.add_argument("-k", type=int, default=5, help="neighbours per query (5)")
    p.add_argument("-o", "--output", help="a .png contact sheet or a .json file of the result")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_neighbours)

    p = sub.add_parser("stats", help="feature statistics of a run's encoder on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument(
        "--classes", help="class ids of the pre-training set, e.g. 0,1,2,3,4: distance to the rest"
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_stats)

    p = sub.add_parser("stages", help="probe every encoder stage and projector layer of runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--data", metavar="NAME", help="transfer: probe on this dataset (e.g. digits)")
    p.add_argument("--knn", action="store_true", help="a kNN probe per stage too")
    p.add_argument(
        "--chart", help="PNG file or folder of linear top-1 per stage (default RUN_DIR/stages.png)"
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_stages)

    p = sub.add_parser(
        "gradients", help="split runs' loss gradients into positive and negative parts (UniGrad)"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs, shown side by side")
    p.add_argument("--batches", type=int, default=4, help="seeded training batches per run")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_gradients)

    p = sub.add_parser("report", help="one self-contained HTML page about runs (figures inside)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument(
        "-o", "--output", default="report.html", help="file or folder (default: report.html)"
    )
    p.add_argument("--map-images", type=int, default=1000, help="test images mapped (1000)")
    p.add_argument("--bank-images", type=int, default=2000, help="train images searched (2000)")
    p.add_argument("--queries", type=int, default=6, help="test images retrieved for (6)")
    p.add_argument("--neighbours", type=int, default=8, help="train images per query (8)")
    p.add_argument("--seed", type=int, default=0, help="of the image subsets and t-SNE (0)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "gap", help="semantic gap: pre-train on some classes at several sizes, probe the others"
    )
    p.add_argument("recipe", help="the self-supervised recipe (name or YAML path)")
    p.add_argument(
        "--pre-classes", required=True, help="class ids of pre-D, e.g. 0,1,2,3,4 (eval-D: the rest)"
    )
    p.add_argument(
        "--sizes", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="fractions of pre-D"
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="pre-training epochs of each run")
    length.add_argument("--minutes", type=float, help="or a time budget for each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--supervised", help="supervised recipe (default: supervised/<dataset>)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="for the recipe (train.*, eval.*: for the supervised baseline too)",
    )
    p.add_argument("--out", default="runs/gap", help="runs and table (reused)")
    p.add_argument("--device", default="auto", help="for the probes")
    p.set_defaults(func=_gap)

    p = sub.add_parser(
        "momentum", help="each recipe with a stop-gradient and a momentum target, side by side"
    )
    p.add_argument("recipes", nargs="+", help="recipe names or YAML paths (e.g. simclr/...)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="pre-training epochs of every run")
    length.add_argument("--minutes", type=float, help="or a time budget for every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="for every recipe")
    p.add_argument("--batches", type=int, default=4, help="seeded batches of the decomposition")
    p.add_argument("--out", default="runs/momentum", help="runs and table (reused)")
    p.add_argument("--device", default="auto", help="for the probes and the decomposition")
    p.set_defaults(func=_momentum)

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
    _say_run(run)
    return 0


def _say_run(run: Any) -> None:
    """The run folder, printed once: by torchrun's rank 0 (RANK in the environment) only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {run.path}")


def _finetune(args: argparse.Namespace) -> int:
    from selfsup.engine.train import finetune

    run = finetune(args.run_dir, args.overrides, args.recipe)
    _say_run(run)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from selfsup.eval.protocols import CLASSIFY, PROTOCOLS, evaluate
    from selfsup.run import Run

    protocols = [args.protocol]
    if args.protocol == "all":  # and the classifier's own accuracy where there is one
        own_classes = args.data is None and hasattr(Run(args.run_dir).method, "classify")
        protocols = [*PROTOCOLS, *([CLASSIFY] if own_classes else [])]
    results = evaluate(args.run_dir, protocols, args.device, args.data, args.overrides)
    for key, value in results.items():
        shown = f"{value:g}" if key.endswith("weight_decay") else f"{value:6.2f}"
        print(f"{key:20s} {shown}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from selfsup.eval.protocols import embed

    output = output_file(args.output, "features.npy", "--output")
    array = embed(args.run_dir, args.images, output, device=args.device)
    print(f"wrote {output}: {array.shape[0]} x {array.shape[1]} float32")
    return 0


def _export(args: argparse.Namespace) -> int:
    from selfsup.eval.export import DEFAULT_NAMES, describe_onnx, export

    name = DEFAULT_NAMES[args.format]
    output = output_file(args.output, name, "--output") if args.output else None
    path = export(args.run_dir, output, format=args.format)
    print(f"wrote {path}" + (f": {describe_onnx(path)}" if args.format == "onnx" else ""))
    return 0


def _neighbours(args: argparse.Namespace) -> int:
    from selfsup.eval.neighbours import format_result, neighbours

    result = neighbours(args.run_dir, args.images, args.gallery, args.k, args.output, args.device)
    print(format_result(result))
    if args.output:
        print(f"wrote {args.output}")
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
    from selfsup.studies.compare import compare, markdown

    table = compare(args.recipes, args.minutes, args.seeds, args.set, args.out)
    print(markdown(table))
    print(f"\ntable: {args.out}/compare.md (.json); chart: {args.out}/compare.png")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from selfsup.studies.demo import demo

    result = demo(args.recipe, args.minutes, args.overrides)
    config, run = result.config, result.run
    epochs = run.epochs
    backbone = ", ".join(f"{k}={v}" for k, v in config.backbone.items() if k != "name")
    k = config.eval.knn_k
    rows = [
        ("raw pixels", result.pixels),
        (f"{config.method['name']} + {config.backbone['name']} ({backbone})", result.learned),
    ]
    budget = config.train.budget_minutes
    chosen = ""
    if budget:
        from selfsup.engine.budget import replay_overrides

        event = next(r for r in run.metrics if r.get("event") == "budget")
        replay = shlex.join(replay_overrides(run.config, event))
        chosen = f" (chosen to fill {budget:g} minutes; replay: {replay})"
    print(
        f"\n{config.data['name']} {config.eval.test_split} split, "
        f"{epochs:.3g} epochs of pre-training{chosen}"
    )
    print(f"{'features':44s} {f'kNN top-1 (k={k})':>18s} {'linear top-1':>13s}")
    for name, r in rows:
        print(f"{name:44s} {r['knn_top1']:18.2f} {r['linear_top1']:13.2f}")
    print(
        f"\ntime: pre-training {format_duration(result.train_seconds)}, evaluation "
        f"{format_duration(result.eval_seconds)}; run folder: {run.path}"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from selfsup.data.selection import parse_classes
    from selfsup.eval.analysis import feature_statistics

    classes = parse_classes(args.classes) if args.classes is not None else None
    results = feature_statistics(args.run_dir, args.split, classes, device=args.device)
    for key, value in results.items():
        print(f"{key:22s} {value:.6g}")
    return 0


def _stages(args: argparse.Namespace) -> int:
    from selfsup.eval.stages import chart_name, compare_stages

    protocols = ["linear", "knn"] if args.knn else ["linear"]
    chart = output_file(args.chart, chart_name(args.data), "--chart") if args.chart else None
    tables, chart = compare_stages(args.run_dirs, args.data, protocols, args.device, chart)
    print(tables)
    print(f"chart: {chart}")
    return 0


def _gradients(args: argparse.Namespace) -> int:
    from pathlib import Path

    from selfsup.eval.gradients import format_table, gradient_decomposition

    names = [Path(run_dir).name for run_dir in args.run_dirs]
    if len(set(names)) < len(names):  # folders of one name in different places: full paths
        names = list(args.run_dirs)
    results = {
        name: gradient_decomposition(run_dir, args.batches, args.device)
        for name, run_dir in zip(names, args.run_dirs, strict=True)
    }
    print(format_table(results))
    return 0


def _report(args: argparse.Namespace) -> int:
    from selfsup.report import Settings, write_report

    settings = Settings(
        args.map_images, args.bank_images, args.queries, args.neighbours, args.seed, args.device
    )
    output = output_file(args.output, "report.html", "--output")
    print(f"report: {write_report(args.run_dirs, output, settings)}")
    return 0


def _gap(args: argparse.Namespace) -> int:
    from selfsup.data.selection import parse_classes
    from selfsup.studies.gap import markdown, semantic_gap

    table = semantic_gap(
        args.recipe,
        parse_classes(args.pre_classes, "--pre-classes"),
        args.sizes,
        args.epochs,
        args.minutes,
        args.seed,
        args.supervised,
        args.set,
        args.out,
        args.device,
    )
    print(markdown(table))
    print(f"\ntable: {args.out}/gap.md (.json)")
    return 0


def _momentum(args: argparse.Namespace) -> int:
    from selfsup.studies.momentum import markdown, momentum_experiment

    table = momentum_experiment(
        args.recipes,
        args.epochs,
        args.minutes,
        args.seed,
        args.set,
        args.out,
        args.batches,
        args.device,
    )
    print(markdown(table))
    print(f"\ntable: {args.out}/momentum.md (.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
