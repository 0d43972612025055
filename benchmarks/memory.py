"""Resident memory over long training: whether a recipe's steps keep the process's memory flat.

    python benchmarks/memory.py                      # a queue, a memory bank, multi-crop; shrunk
    python benchmarks/memory.py moco_v2/fashion_mnist --steps 5000 --set optim.batch_size=256

Each recipe runs in a fresh process (spawned), so that its resident memory is its own and not
what an earlier recipe left in the allocator. There its parts are built as training builds them
(`Parts.build`, through throughput.build) and it trains --steps real steps (`Parts.step`) with the
loop's per-step bookkeeping (engine/train.py: the clock's tick, the metric window of each log
line). The process's memory is read every --every steps, twice: the resident set size (VmRSS of
/proc/self/status) as it is, and after the allocator has handed its free memory back to the
system (glibc's malloc_trim): the memory in use. The first is what the system sees; it moves by
tens of MiB between readings when a step frees large temporaries that the allocator keeps or not
as it sees fit (InstDisc's similarities to its 60,000 bank entries: 15 MiB a copy). The second
decides the verdict. The table gives both after --warmup steps (the allocator's pools, the queue
or bank filled, the optimiser's state made) and at the end; the memory in use should grow by
less than --target percent between the two. A list that grows per step, or a tensor kept with
its graph, grows it in proportion to the steps.

Left out: the kNN monitor, the collapse guard and checkpoints, which run once an epoch or once a
log line and allocate per call, not per step.

The default --set shrinks the recipes to a 2-core CPU (a narrow backbone, 16-px views, batch 64)
and keeps what each is measured for: MoCo v2's queue of 4096 keys, InstDisc's memory bank of one
entry per image of Fashion-MNIST's 60,000, SwAV's two small crops beside its two large ones.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from throughput import build

from selfsup.engine.clock import TrainingClock
from selfsup.engine.log import MetricWindow

RECIPES = ["moco_v2/fashion_mnist", "instdisc/fashion_mnist", "swav/fashion_mnist"]
SHRINK = ["backbone.width=0.125", "views.size=16", "optim.batch_size=64"]


def resident_mib() -> float:
    """The resident set size of this process (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS in /proc/self/status: the benchmark needs Linux")


def in_use_mib() -> float:
    """The resident set size after the allocator has handed its free memory back to the system
    (glibc's malloc_trim): what the process still uses. Freed large temporaries otherwise stay
    resident as the allocator sees fit (InstDisc's (batch, 60,000) similarities: 15 MiB each),
    so that the plain RSS moves by tens of MiB from one reading to the next without a leak."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return resident_mib()


def measure(
    recipe: str, overrides: list[str], steps: int, every: int, warmup: int, threads: int | None
) -> dict[str, Any]:
    """The resident and the in-use MiB of `recipe`'s training, read every `every` steps
    ({step: MiB}), and their growth in % from step `warmup` to the last step."""
    if threads:
        torch.set_num_threads(threads)
    config, _, parts = build(recipe, overrides)
    parts.method.train()
    clock = TrainingClock()
    window = MetricWindow(parts.batches.batch_size, clock)
    log_every = config.train.log_every
    resident, in_use = {0: resident_mib()}, {0: in_use_mib()}
    for step in range(steps):
        out = parts.step(step)
        clock.tick()
        window.add(out)
        done = step + 1
        if done % log_every == 0:  # the loop's log line: means over the window, then a new one
            window.line(done, done / parts.batches.steps_per_epoch, 0.0, Path("last.pt"))
            window.restart()
        if done % every == 0 or done == steps:
            resident[done] = resident_mib()  # first: in_use_mib changes what stays resident
            in_use[done] = in_use_mib()
    start = max(s for s in resident if s <= warmup)
    after = [v for s, v in resident.items() if s >= start]
    return {
        "recipe": recipe,
        "steps": steps,
        "start": start,
        "threads": torch.get_num_threads(),
        "resident_mib": resident,
        "in_use_mib": in_use,
        "resident_range": (min(after), max(after)),
        "resident_growth": 100 * (resident[steps] - resident[start]) / resident[start],
        "in_use_growth": 100 * (in_use[steps] - in_use[start]) / in_use[start],
    }


def measure_alone(*args: Any) -> dict[str, Any]:
    """`measure` in a fresh spawned process: memory no earlier recipe has touched."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=RECIPES)
    parser.add_argument(
        "--set", nargs="*", default=SHRINK, help=f"overrides for every recipe ({' '.join(SHRINK)})"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="read the memory every N steps")
    parser.add_argument("--warmup", type=int, default=200, help="growth is measured from here")
    parser.add_argument("--target", type=float, default=2.0, help="growth allowed, in %%")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps or args.every < 1:
        parser.error("need 0 <= --warmup < --steps and --every >= 1")
    print(f"# {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print(f"# overrides: {' '.join(args.set) or '(none)'}")
    results = []
    for recipe in args.recipes:
        r = measure_alone(recipe, args.set, args.steps, args.every, args.warmup, args.threads)
        for kind in ("resident", "in_use"):
            samples = " ".join(f"{s}:{v:.0f}" for s, v in r[f"{kind}_mib"].items())
            print(f"{recipe} {kind} MiB by step: {samples}")
        results.append(r)
    print()
    print(
        f"| recipe | RSS, step {args.warmup} → {args.steps} | RSS range after step "
        f"{args.warmup} | in use, step {args.warmup} → {args.steps} | verdict |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        resident, in_use, start, end = r["resident_mib"], r["in_use_mib"], r["start"], r["steps"]
        low, high = r["resident_range"]
        verdict = "flat" if r["in_use_growth"] < args.target else f"grows (over {args.target:g} %)"
        print(
            f"| {r['recipe']} | {resident[start]:.1f} → {resident[end]:.1f} MiB "
            f"({r['resident_growth']:+.2f} %) | {low:.1f}-{high:.1f} MiB | {in_use[start]:.1f} → "
            f"{in_use[end]:.1f} MiB ({r['in_use_growth']:+.2f} %) | {verdict} |"
        )
    return results


if __name__ == "__main__":
    main()
