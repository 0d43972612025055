"""kill -9 safety: a real `selfsup train` process killed with SIGKILL at a random moment and
resumed ends exactly as an uninterrupted run (weights, optimiser, key queue, metrics without
duplicates), recomputing no more than the steps since its last checkpoint."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from selfsup.files import read_checkpoint, read_metrics

STEPS_PER_EPOCH, EPOCHS = 4, 5  # 32 synthetic images, batch 8: a checkpoint every 4 steps


def _recipe(tmp_path, name):
    recipe = {
        "method": {"name": "moco", "dim": 16, "mlp_hidden": 32, "queue_size": 20,
                   "momentum": 0.9, "temperature": 0.2, "shuffle_bn_groups": 2},
        "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
        "data": {"name": "synthetic", "per_class": 8, "size": 16, "num_classes": 4},
        "views": {"name": "simclr", "size": 16, "blur_p": 0.0},
        "optim": {"name": "sgd", "lr": 0.1, "batch_size": 8, "warmup_epochs": 1},
        "train": {"epochs": EPOCHS, "out_dir": str(tmp_path), "name": name, "progress": False,
                  "log_every": 1, "knn_every": 0, "threads": 1},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _selfsup(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "selfsup", *args], **kwargs)


def _logged_steps(run):
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, seed):
    straight = _selfsup("train", str(_recipe(tmp_path, "straight")), stderr=subprocess.PIPE)
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()

    total = STEPS_PER_EPOCH * EPOCHS
    kill_at = random.Random(seed).randrange(STEPS_PER_EPOCH + 1, total - 1)  # seeded "random"
    run = tmp_path / "killed"
    victim = _selfsup("train", str(_recipe(tmp_path, "killed")), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or max(_logged_steps(run), default=0) < kill_at:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_step = max(_logged_steps(run))
    saved_step = read_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert saved_step <= killed_step < total, "killed mid-run, after a checkpoint"

    resumed = _selfsup("train", "--resume", str(run), stderr=subprocess.PIPE)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()

    recomputed = killed_step - saved_step
    assert recomputed <= STEPS_PER_EPOCH, "nothing beyond the checkpoint interval is redone"
    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = read_checkpoint(run / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == total
    for key in a["method"]:  # weights, EMA key encoder, queue and its pointer
        torch.testing.assert_close(a["method"][key], b["method"][key], rtol=0, atol=0, msg=key)
    assert "queue.ptr" in b["method"]
    states = zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True)
    for x, y in states:
        torch.testing.assert_close(x["momentum_buffer"], y["momentum_buffer"], rtol=0, atol=0)
    assert _logged_steps(run) == list(range(1, total + 1)), "each step logged once"
    losses = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    straight_losses = {
        r["step"]: r["loss"]
        for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
        if "loss" in r
    }
    assert losses == straight_losses
