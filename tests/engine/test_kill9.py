"""kill -9 safety: a real `selfsup train` process killed with SIGKILL at a random moment and
resumed ends exactly as an uninterrupted run (weights, optimiser, key queue, metrics without
duplicates), recomputing no more than the steps since its last checkpoint; also with micro-batches
(train.accumulate), and on two torchrun processes, one of them killed."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from selfsup.files import read_checkpoint, read_metrics

STEPS_PER_EPOCH, EPOCHS = 4, 5  # 32 synthetic images, batch 8: a checkpoint every 4 steps
TOTAL = STEPS_PER_EPOCH * EPOCHS
METHODS = {
    "moco": {"name": "moco", "dim": 16, "mlp_hidden": 32, "queue_size": 20, "momentum": 0.9,
             "temperature": 0.2, "shuffle_bn_groups": 2},
    "simclr": {"name": "simclr", "dim": 16, "hidden": 32, "temperature": 0.5},  # gathers
    "byol": {"name": "byol", "dim": 16, "hidden": 32, "momentum": 0.9},  # a mean over samples
}  # fmt: skip


def _recipe(tmp_path, name, method="moco", accumulate=1):
    recipe = {
        "method": METHODS[method],
        "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
        "data": {"name": "synthetic", "per_class": 8, "size": 16, "num_classes": 4},
        "views": {"name": "simclr", "size": 16, "blur_p": 0.0},
        "optim": {"name": "sgd", "lr": 0.1, "batch_size": 8, "warmup_epochs": 1},
        "train": {"epochs": EPOCHS, "out_dir": str(tmp_path), "name": name, "progress": False,
                  "log_every": 1, "knn_every": 0, "threads": 1, "accumulate": accumulate},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _selfsup(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "selfsup", *args], **kwargs)


def _torchrun(*args, **kwargs):
    """`selfsup` on two local processes under torchrun, in a session of its own."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*command, "-m", "selfsup", *args], env=environment, start_new_session=True, **kwargs
    )


def _logged_steps(run):
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _wait_for_step(run, process, step):
    """Until `process` (running `run`) has logged `step`; the log is the signal (no timing)."""
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or max(_logged_steps(run), default=0) < step:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _finish(process):
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-3000:]


def _kill_and_resume(tmp_path, seed, method="moco", accumulate=1):
    """Train a run straight through; train it again, kill it with SIGKILL at a seeded "random"
    step after its first checkpoint and resume it: (straight run folder, resumed run folder)."""
    _finish(_selfsup("train", str(_recipe(tmp_path, "straight", method, accumulate)),
                     stderr=subprocess.PIPE))  # fmt: skip
    kill_at = random.Random(seed).randrange(STEPS_PER_EPOCH + 1, TOTAL - 1)
    run = tmp_path / "killed"
    recipe = _recipe(tmp_path, "killed", method, accumulate)
    victim = _selfsup("train", str(recipe), stderr=subprocess.DEVNULL)
    _wait_for_step(run, victim, kill_at)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_step = max(_logged_steps(run))
    saved_step = read_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert saved_step <= killed_step < TOTAL, "killed mid-run, after a checkpoint"

    _finish(_selfsup("train", "--resume", str(run), stderr=subprocess.PIPE))
    recomputed = killed_step - saved_step
    assert recomputed <= STEPS_PER_EPOCH, "nothing beyond the checkpoint interval is redone"
    return tmp_path / "straight", run


def _assert_the_same_end(straight, run):
    """The same last checkpoint (weights, the method's state, the optimiser's momentum) and the
    same loss at every step, each step logged once."""
    a = read_checkpoint(straight / "checkpoints" / "last.pt")
    b = read_checkpoint(run / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == TOTAL
    assert a["method"].keys() == b["method"].keys()
    for key in a["method"]:  # weights, EMA key encoder or target, queue and its pointer
        torch.testing.assert_close(a["method"][key], b["method"][key], rtol=0, atol=0, msg=key)
    states = zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True)
    for x, y in states:
        torch.testing.assert_close(x["momentum_buffer"], y["momentum_buffer"], rtol=0, atol=0)
    assert _logged_steps(run) == list(range(1, TOTAL + 1)), "each step logged once"
    assert _losses(run) == _losses(straight)


def _losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, seed):
    straight, run = _kill_and_resume(tmp_path, seed)
    _assert_the_same_end(straight, run)
    assert "queue.ptr" in read_checkpoint(run / "checkpoints" / "last.pt")["method"]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_a_run_on_micro_batches_killed_with_sigkill_resumes_to_the_uninterrupted_result(
    tmp_path, method
):
    """train.accumulate=2: SimCLR gathers its negatives over the micro-batches (gradient
    caching, whose number of recording sweeps the first step of each sitting learns again); BYOL
    needs no gather (plain accumulation)."""
    straight, run = _kill_and_resume(tmp_path, 2, method, accumulate=2)
    _assert_the_same_end(straight, run)


def _children(pid):
    """{rank: pid} of the processes that `pid` (torchrun) started."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if entry.name.isdigit() and int(fields[1]) == pid:
                environment = (entry / "environ").read_bytes().split(b"\0")
                rank = next(v for v in environment if v.startswith(b"RANK="))
                workers[int(rank.partition(b"=")[2])] = int(entry.name)
        except (OSError, StopIteration):  # gone meanwhile, or not a worker
            continue
    return workers


def _running(pid):
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # three torchrun launches of two processes
@pytest.mark.parametrize("rank", [0, 1])
def test_a_torchrun_worker_killed_with_sigkill_stops_the_run_and_it_resumes_exactly(tmp_path, rank):
    """kill -9 of one of two workers (rank 0 writes the run folder; rank 1 does not): torchrun
    stops the other and fails, no process is left, and the run resumed on two processes ends
    as the run straight through on two."""
    straight = _torchrun("train", str(_recipe(tmp_path, "straight")), stderr=subprocess.PIPE)
    _finish(straight)
    run = tmp_path / "killed"
    launcher = _torchrun("train", str(_recipe(tmp_path, "killed")), stderr=subprocess.DEVNULL)
    _wait_for_step(run, launcher, STEPS_PER_EPOCH + 2)
    workers = _children(launcher.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[rank], signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0, "torchrun reports the failure"
    left = [pid for pid in workers.values() if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "no worker is left running"
    saved_step = read_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert STEPS_PER_EPOCH <= saved_step < TOTAL

    _finish(_torchrun("train", "--resume", str(run), stderr=subprocess.PIPE))
    _assert_the_same_end(tmp_path / "straight", run)
