"""The collapse guard: its statistics against their definitions, the guard firing on a collapsed
encoder (and stopping the run with a clear message) but not on a healthy run, and turning off."""

import math
from pathlib import Path

import pytest
import torch

import selfsup
from selfsup.config import resolve
from selfsup.engine.collapse import (
    MIN_RANK,
    MIN_STD,
    PATIENCE,
    PROBE_SIZE,
    CollapseError,
    CollapseGuard,
)
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


# The guard's rule (both statistics below their floors for PATIENCE checks in a row), on
# embeddings made to sit on either side of each floor: the guard's images are their own indices,
# which a stand-in encoder maps to chosen rows.
def _embeddings(kind: str) -> torch.Tensor:
    """(256, 128) rows: healthy, collapsed (both statistics low), or only one of them low."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(PROBE_SIZE, 128, generator=generator)
    pole = torch.zeros(PROBE_SIZE, 128)
    pole[:, 0] = 1
    if kind == "healthy":
        return noise
    if kind == "collapsed":  # one vector: spread ~1e-4, rank ~1
        return pole + 1e-5 * noise
    if kind == "spread_low":  # a small cap around one vector, but over many directions
        return pole + 1e-3 * noise
    if kind == "rank_low":  # two opposite vectors: one line (rank 1), far apart (spread 1/√D)
        signs = torch.arange(PROBE_SIZE) % 2 * 2 - 1
        return pole * signs[:, None] + 1e-5 * noise
    raise ValueError(kind)


def _guard() -> CollapseGuard:
    images = torch.arange(PROBE_SIZE, dtype=torch.uint8).view(-1, 1, 1, 1)  # each its index
    return CollapseGuard(images, lambda batch: batch.long().flatten(), "cpu")


def _check(guard: CollapseGuard, kind: str, step: int) -> dict[str, float]:
    features = _embeddings(kind)
    return guard(lambda index: features[index], step)


def test_the_floors_sit_where_the_guard_tests_need_them():
    stats = {kind: _check(_guard(), kind, 0) for kind in ("healthy", "spread_low", "rank_low")}
    assert stats["healthy"]["embed_std"] > MIN_STD and stats["healthy"]["embed_rank"] > MIN_RANK
    assert stats["spread_low"]["embed_std"] < MIN_STD
    assert stats["spread_low"]["embed_rank"] > 1.5 * MIN_RANK
    assert stats["rank_low"]["embed_std"] > 4 * MIN_STD
    assert stats["rank_low"]["embed_rank"] < 1.1


def test_guard_stops_only_after_patience_consecutive_checks_with_both_below_their_floors():
    guard = _guard()
    checks = ["collapsed"] * (PATIENCE - 1) + ["healthy"] + ["collapsed"] * (PATIENCE - 1)
    for step, kind in enumerate(checks, 1):  # never PATIENCE collapsed checks in a row: no stop
        _check(guard, kind, step)
    with pytest.raises(CollapseError, match=f"collapsed at step {len(checks) + 1}"):
        _check(guard, "collapsed", len(checks) + 1)  # the PATIENCE-th in a row


@pytest.mark.parametrize("kind", ["spread_low", "rank_low"])
def test_guard_lets_the_run_go_on_when_only_one_statistic_is_below_its_floor(kind):
    guard = _guard()
    for step in range(1, 3 * PATIENCE + 1):  # well past the patience, every check the same
        stats = _check(guard, kind, step)
        below = (stats["embed_std"] < MIN_STD, stats["embed_rank"] < MIN_RANK)
        assert below == ((True, False) if kind == "spread_low" else (False, True))
