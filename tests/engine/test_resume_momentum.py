"""Momentum methods resume exactly: weights, EMA target, key queue and its pointer."""

import pytest
import torch

import selfsup
from selfsup.config import resolve

METHODS = {
    "moco": {
        "name": "moco", "dim": 16, "mlp_hidden": 32, "queue_size": 40, "momentum": 0.9,
        "temperature": 0.2, "shuffle_bn_groups": 2,
    },  # queue 40: not a multiple of the batch of 32, so the pointer wraps mid-batch
    "byol": {"name": "byol", "dim": 16, "hidden": 32, "momentum": 0.9},
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resumed_run_matches_the_straight_run(tiny_config, method):
    tiny_config["method"] = METHODS[method]
    tiny_config["train"].update(max_steps=6, knn_every=0, name="straight")
    straight = selfsup.train(resolve(tiny_config)).checkpoint()
    tiny_config["train"].update(max_steps=3, name="halves")
    first_half = selfsup.train(resolve(tiny_config))
    resumed = selfsup.train(resume=first_half.path, overrides=["train.max_steps=6"]).checkpoint()
    assert straight["step"] == resumed["step"] == 6
    a, b = straight["method"], resumed["method"]
    assert a.keys() == b.keys()
    assert any(key.startswith("target.copies.") for key in a)  # the EMA target is saved
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    if method == "moco":
        assert a["queue.ptr"].item() == b["queue.ptr"].item() == 6 * 32 % 40
