"""Training throughput and pipeline efficiency of recipes, measured in one run.

    python benchmarks/throughput.py                                   # the default CPU recipe
    python benchmarks/throughput.py simclr/fashion_mnist moco_v2/fashion_mnist byol/fashion_mnist

throughput: images per second of full training steps (the views of one image count once).
efficiency: time of the backbone work the method needs ÷ time of a full training step. The
backbone work is recorded from one real step (every call of the backbone class — online encoder
and target copies alike — with its batch shape and whether it carried gradient) and replayed on
pre-made crops: forward+backward for gradient calls, forward only for the rest. Everything else
in a step (augmentation, heads, loss, optimizer, EMA, queue, shuffling) is the overhead that
makes efficiency fall below 1.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from selfsup.build import load_data
from selfsup.config import Config, load_config
from selfsup.data.datasets import ImageData
from selfsup.engine.parts import Parts


def _timed(fn, steps: int, warmup: int) -> float:  # noqa: ANN001
    """Seconds per call: best of three rounds of `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def backbone_modules(method: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module of the backbone's class in `method`: the online backbone, its target copies
    (EMA, momentum encoder), CMC's second encoder."""
    kind = type(method.backbone)
    return [m for m in method.modules() if type(m) is kind]


def build(recipe: str, overrides: list[str]) -> tuple[Config, ImageData, Parts]:
    """The config, the train split and the parts of `recipe` as training builds them, with a
    schedule long enough for any number of benchmark steps."""
    config = load_config(recipe, overrides)
    data = load_data(config, "train")
    return config, data, Parts.build(config.replace(["train.epochs=1000000"]), data)


def backbone_calls(method: torch.nn.Module, step: Callable[[], None]) -> list[tuple]:
    """(module, input shape, gradient enabled) of every backbone call during one `step()`: calls
    of any module of the backbone's class (target copies, CMC's second encoder)."""
    calls: list[tuple] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        calls.append((module, tuple(args[0].shape), torch.is_grad_enabled()))

    hooks = [m.register_forward_pre_hook(record) for m in backbone_modules(method)]
    try:
        step()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def measure(
    recipe: str, overrides: list[str], steps: int, warmup: int, step_only: bool = False
) -> dict[str, Any]:
    """img/s, efficiency, augment share and backbone work of `recipe` (img/s only: `step_only`)."""
    config, _, parts = build(recipe, overrides)
    method, device, memory_format = parts.method.train(), parts.device, parts.memory_format
    counter = iter(range(10**9))

    def step() -> None:
        parts.step(next(counter))["loss"].item()  # .item(): wait for the device

    calls = backbone_calls(method, step)
    inputs = [
        (module, torch.randn(shape, device=device).contiguous(memory_format=memory_format), grad)
        for module, shape, grad in calls
    ]

    def backbone_only() -> None:
        for module, x, grad in inputs:
            if grad:
                module(x).sum().backward()
            else:
                with torch.no_grad():
                    module(x)
        method.zero_grad(set_to_none=True)

    def augment_only() -> None:
        parts.views(parts.batches.next()[0], parts.generator)

    step_time = _timed(step, steps, warmup)
    batch = config.optim.batch_size
    if step_only:
        return {"img_per_s": batch / step_time}
    backbone_time = _timed(backbone_only, steps, warmup)
    augment_time = _timed(augment_only, steps, warmup)
    with_grad = sum(shape[0] for _, shape, grad in calls if grad)
    without = sum(shape[0] for _, shape, grad in calls if not grad)
    return {
        "backbone_work": f"{with_grad} fb + {without} f",
        "img_per_s": batch / step_time,
        "efficiency": backbone_time / step_time,
        "augment_share": augment_time / step_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=["simclr/fashion_mnist"])
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every recipe")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'recipe':28s} {'img/s':>8s} {'efficiency':>11s} {'augment share':>14s}  backbone work")
    for recipe in args.recipes:
        r = measure(recipe, args.set, args.steps, args.warmup)
        print(
            f"{recipe:28s} {r['img_per_s']:8.0f} {r['efficiency']:11.2f} "
            f"{r['augment_share']:14.3f}  {r['backbone_work']}"
        )


if __name__ == "__main__":
    main()
