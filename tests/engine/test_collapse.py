"""The collapse guard: its statistics against their definitions, the guard firing on a collapsed
encoder (and stopping the run with a clear message) but not on a healthy run, and turning off."""

import math
from pathlib import Path

import pytest
import torch

import selfsup
from selfsup.config import resolve
from selfsup.engine.collapse import PATIENCE, CollapseError
from selfsup.probes.statistics import effective_rank, normalized_std
from selfsup.run import Run


def test_normalized_std_is_the_mean_std_of_unit_vectors_times_sqrt_d():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    unit = [row / math.sqrt(sum(v * v for v in row.tolist())) for row in x]
    stds = []
    for d in range(3):
        column = [float(u[d]) for u in unit]
        mean = sum(column) / 6
        stds.append(math.sqrt(sum((c - mean) ** 2 for c in column) / 5))  # unbiased, as torch
    assert math.isclose(normalized_std(x), sum(stds) / 3 * math.sqrt(3), rel_tol=1e-9)


def test_effective_rank_is_exp_entropy_of_the_normalised_singular_values():
    e = torch.eye(4, dtype=torch.float64)
    assert math.isclose(effective_rank(e), 4.0, rel_tol=1e-6)  # four equal singular values
    rows = torch.stack([e[0], 2 * e[0], 5 * e[0], e[1]])  # unit rows e1, e1, e1, e2: σ = √3, 1
    p = torch.tensor([math.sqrt(3), 1.0]) / (math.sqrt(3) + 1)
    assert math.isclose(effective_rank(rows), math.exp(-(p * p.log()).sum()), rel_tol=1e-6)


def test_statistics_of_collapsed_and_spread_embeddings():
    generator = torch.Generator().manual_seed(1)
    spread = torch.randn(256, 32, generator=generator)
    collapsed = torch.ones(256, 32) + 1e-4 * torch.randn(256, 32, generator=generator)
    assert normalized_std(spread) > 0.9 and effective_rank(spread) > 25
    assert normalized_std(collapsed) < 1e-3 and effective_rank(collapsed) < 1.01


def test_guard_stops_a_collapsed_run_with_the_step_values_and_advice(tiny_config, collapsed_simclr):
    tiny_config["train"].update(knn_every=0, log_every=2)
    with pytest.raises(CollapseError) as error:
        selfsup.train(resolve(tiny_config))
    text = str(error.value)
    step = 2 * PATIENCE  # the PATIENCE-th metrics line
    assert f"collapsed at step {step}" in text and "optim.lr" in text
    assert "train.collapse_guard=false" in text
    run = Run(Path(tiny_config["train"]["out_dir"]) / tiny_config["train"]["name"])
    last = run.metrics[-1]
    assert last["event"] == "collapse" and last["step"] == step and last["embed_std"] < 1e-6
    assert not any(r.get("event") == "end" for r in run.metrics)


def test_guard_can_be_turned_off(tiny_config, collapsed_simclr):
    tiny_config["train"].update(knn_every=0, log_every=2, collapse_guard=False)
    run = selfsup.train(resolve(tiny_config))
    assert any(r.get("event") == "end" for r in run.metrics)
    assert not any("embed_std" in r for r in run.metrics)


def test_guard_logs_the_statistics_of_a_healthy_run_and_lets_it_finish(tiny_config):
    tiny_config["train"].update(knn_every=0, log_every=2)
    run = selfsup.train(resolve(tiny_config))
    lines = [r for r in run.metrics if "loss" in r]
    assert lines and all(r["embed_std"] > 0.05 and r["embed_rank"] > 1.5 for r in lines)
    assert any(r.get("event") == "end" for r in run.metrics)
