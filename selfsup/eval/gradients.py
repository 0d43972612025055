"""The gradient decomposition (decomposition.py) of a trained run, and a table of runs
side by side (`selfsup gradients RUN...`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from selfsup.build import load_data, pick_device
from selfsup.decomposition import decompose, with_balance
from selfsup.methods import with_gradient_terms
from selfsup.run import Run
from selfsup.step import Views


def gradient_decomposition(
    run_dir: str | Path | Run, batches: int = 4, device: str = "auto"
) -> dict[str, Any]:
    """The gradient decomposition of a run's last checkpoint on `batches` seeded training batches.

    Each batch (optim.batch_size images of a permutation seeded by train.seed) gets two views from
    the run's own augmentation; the method runs in training mode (batch-norm statistics of the
    batch, as in a training step), in float32 on one process; its `gradient_terms` returns the
    parts of ∂L/∂u of every loss term (symmetrised losses: both), and `gradient_scalars` of every
    term are averaged over terms and batches (balance: the ratio of the averaged norms).
    Asymmetric methods also get the `projection_` scalars: the same parts carried back through
    the predictor.
    Writes <run>/gradients.json and returns what it wrote.
    """
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    name = run.config.method["name"]
    if name not in with_gradient_terms():
        raise ValueError(
            f"gradient decomposition of method '{name}' is not supported; supported: "
            f"{', '.join(with_gradient_terms())}"
        )
    if batches < 1:
        raise ValueError(f"--batches must be >= 1, got {batches}")
    device = pick_device(device)
    method = run.method.to(device).train()  # a private copy: its BN statistics may move
    data = load_data(run.config, "train")
    batch_size = min(run.config.optim.batch_size, len(data))
    seed = run.config.train.seed
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator(device).manual_seed(seed)
    per_batch = []
    with torch.random.fork_rng():  # the caller's global RNG state is left as it was
        torch.manual_seed(seed)  # MoCo's shuffled BN and any stochastic layer
        for b in range(batches):
            index = order[torch.arange(b * batch_size, (b + 1) * batch_size) % len(data)]
            large, small = run.views(data.images[index].to(device), generator)
            per_batch.append(decompose(method, Views(large, small, index.to(device))))
    scalars = with_balance({key: sum(d[key] for d in per_batch) / batches for key in per_batch[0]})
    result = {"method": name, "batches": batches, "batch_size": batch_size, **scalars}
    (run.path / "gradients.json").write_text(json.dumps(result, indent=1))
    return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Runs side by side: one row per scalar (union over the runs, "-" where a run has none; the
    `projection_` rows last), one column per run, headed by its name in `results`."""
    names = list(results)
    rows = list(dict.fromkeys(key for result in results.values() for key in result))
    rows.sort(key=lambda row: row.startswith("projection_"))  # stable: first-seen order kept
    width = max(12, *(len(n) for n in names))
    label = max(len(r) for r in rows)
    lines = [f"{'':{label}s}  " + "  ".join(f"{n:>{width}s}" for n in names)]
    for row in rows:
        cells = []
        for n in names:
            value = results[n].get(row, "-")
            cells.append(
                f"{value:>{width}.4g}" if isinstance(value, float) else f"{value!s:>{width}s}"
            )
        lines.append(f"{row:{label}s}  " + "  ".join(cells))
    return "\n".join(lines)
