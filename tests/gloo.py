"""Run a function on several local processes joined in one gloo group (CPU): the tests of the
distributed paths (gathers, shuffled BN, Sinkhorn, global-batch losses) use this one launcher.

Not a test module (no test_ prefix); tests/ is on sys.path through its conftest, in spawned
children too, so the worker functions of test modules and `_main` below unpickle there.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import pytest


def run_on_processes(worker: Callable[..., Any], world: int, *args: Any) -> dict[int, Any]:
    """{rank: worker(rank, *args)} from `world` spawned processes in one gloo process group.

    Return plain data (lists, numbers) from `worker`: tensors would share memory that outlives
    the process. A worker's exception fails the calling test with the worker's traceback; a
    worker that dies without reporting fails it after two minutes.
    """
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(target=_main, args=(worker, rank, world, port, args, results))
        for rank in range(world)
    ]
    for process in workers:
        process.start()
    try:
        outputs = dict(results.get(timeout=120) for _ in range(world))
    except queue.Empty:
        pytest.fail("a gloo worker died before reporting")
    finally:
        for process in workers:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    for rank, (ok, out) in outputs.items():
        assert ok, f"rank {rank} failed:\n{out}"
    return {rank: out for rank, (_, out) in outputs.items()}


def _main(
    worker: Callable[..., Any], rank: int, world: int, port: int, args: tuple, results: Any
) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a failing peer ends the others quickly
    )
    try:
        results.put((rank, (True, worker(rank, *args))))
    except Exception:
        results.put((rank, (False, traceback.format_exc())))
    dist.destroy_process_group()
