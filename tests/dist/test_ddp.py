"""Training on several processes (DistributedDataParallel over gloo on CPU) equals one process.

The claim (engine/train.py, dist/): with optim.batch_size the global batch, W processes that
each take their 1/W of it compute the same loss and the same gradients as one process on the whole
batch, and a run gives the same weights whether it ran on one or two processes, or stopped on one
and resumed on the other. This is the check that catches a gather that returns the local tensor
or gradients averaged where they should be summed.

BN statistics are the one thing that legitimately differs per process (each normalises its own
rows): the step test (a small ResNet) puts BN in eval mode (running statistics), and the
end-to-end runs use a ViT (layer norm) with MoCo v2's BN-free head.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from gloo import run_on_processes

import selfsup.methods  # noqa: F401  (registers the methods)
from selfsup import dist
from selfsup.augment.views import MultiView, ViewSpec
from selfsup.build import build_method, build_views, load_data
from selfsup.config import resolve
from selfsup.data.loader import Batches
from selfsup.engine.optim import build_optimizer
from selfsup.engine.step import Precision, training_step
from selfsup.engine.train import train
from selfsup.files import load_checkpoint
from selfsup.registry import METHODS as REGISTRY
from selfsup.step import Progress, Views

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
BATCH = 16  # the global batch
INFO = {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25], "num_classes": 10,
        "classes": [str(i) for i in range(10)], "train_size": 40}  # fmt: skip
# Each method at a test's size: queues and Sinkhorn see the global batch of 16.
METHODS = {
    "simclr": {"dim": 16, "hidden": 32, "temperature": 0.5},
    "moco": {"dim": 16, "mlp_hidden": 32, "queue_size": 64, "temperature": 0.2},
    "byol": {"dim": 16, "hidden": 32},
    "barlow_twins": {"dim": 32, "hidden": 32},
    "swav": {"dim": 16, "hidden": 32, "num_prototypes": 20},
    "dino": {"out_dim": 64, "hidden": 32, "bottleneck": 16},
}

# BN in training mode, synchronised: the ResNet's and the projectors' BN see the global batch
SYNC_BN = ("simclr", "byol", "barlow_twins")


def _step(name: str, rank: int, world: int, sync_bn: bool = False) -> dict:
    """One training step of `name` on this process's 1/world of a fixed global batch: its loss
    and the gradient of every trainable parameter (after DDP's averaging), as plain lists.
    BN in eval mode, or with `sync_bn` in training mode over the global batch (train.sync_bn)."""
    config = resolve(
        {
            "method": {"name": name, **METHODS[name]},
            "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
            "data": {"name": "synthetic", "per_class": 4, "size": 16},
            "views": {
                "name": "swav",
                "size": 16,
                "small_size": 8,
                "blur_p": 0.0,
                "num_small": 2 if REGISTRY.get(name).uses_small_views else 0,
            },
            "optim": {"lr": 0.0, "batch_size": BATCH, "warmup_epochs": 0},
        }
    )
    images = load_data(config, "train").images[:BATCH]
    large, small = build_views(config, INFO)(images, torch.Generator().manual_seed(0))
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    # Synchronised BN in float64: float32 summation order, amplified by BN's division by the
    # standard deviation of 8 rows, reaches 1e-5 of the gradients' scale; in float64 a difference
    # above 1e-5 is a bug.
    dtype = torch.float64 if sync_bn else torch.float32
    large, small = [v.to(dtype) for v in large], [v.to(dtype) for v in small]
    views = Views([v[mine] for v in large], [v[mine] for v in small], torch.arange(BATCH)[mine])
    torch.manual_seed(0)
    method = build_method(config, INFO).to(dtype).train()
    if sync_bn:
        method = dist.sync_batch_norm(method, torch.device("cpu"))
    else:
        for module in method.modules():  # running statistics: the same normalisation everywhere
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    torch.manual_seed(100)  # what methods draw from the global RNG (MoCo's shuffle)
    out = training_step(
        method,
        build_optimizer(method, config.optim),
        views,
        Progress(0, 0.0, 0.0),
        Precision("fp32", torch.device("cpu")),
        model=dist.data_parallel(method, torch.device("cpu")),
    )
    grads = {k: p.grad.tolist() for k, p in method.named_parameters() if p.grad is not None}
    return {"loss": out["loss"].item(), "grads": grads}


def _steps_on_each_process(rank: int) -> dict:
    steps = {name: _step(name, rank, WORLD) for name in METHODS}
    return steps | {f"{name}+sync_bn": _step(name, rank, WORLD, True) for name in SYNC_BN}


@pytest.fixture(scope="module")
def per_process():
    return run_on_processes(_steps_on_each_process, WORLD)


@pytest.mark.slow  # spawns processes, as test_gather_two_processes.py
@pytest.mark.parametrize("name", sorted(METHODS) + [f"{name}+sync_bn" for name in SYNC_BN])
def test_two_processes_give_the_loss_and_gradients_of_one_on_the_global_batch(name, per_process):
    method, _, sync_bn = name.partition("+")
    reference = _step(method, 0, 1, bool(sync_bn))
    losses = [per_process[rank][name]["loss"] for rank in range(WORLD)]
    # a per-process loss (BYOL) is the mean over its rows: the ranks' average is the global mean
    assert sum(losses) / WORLD == pytest.approx(reference["loss"], abs=1e-5)
    assert reference["grads"], "no parameter received a gradient"
    expected = _flat(reference["grads"])
    for rank in range(WORLD):
        grads = per_process[rank][name]["grads"]
        assert grads.keys() == reference["grads"].keys()
        # float32 sums in another order: 1e-5 of the gradient's scale (BN-layer gradients reach 30)
        error = (_flat(grads) - expected).abs().max() / expected.abs().max().clamp(min=1)
        assert error < 1e-5, f"rank {rank}: gradients differ by {error:.2e} of their scale"


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([torch.tensor(g).flatten() for _, g in sorted(grads.items())])


def test_each_process_takes_its_contiguous_part_of_every_global_batch():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1)
    whole = Batches(images, 8, seed=3)
    parts = [Batches(images, 8, seed=3, rank=rank, world=WORLD) for rank in range(WORLD)]
    for _ in range(5):  # past an epoch's end (2 steps an epoch)
        batch, index = whole.next()
        pieces = [part.next() for part in parts]
        assert torch.equal(torch.cat([p[1] for p in pieces]), index)
        assert torch.equal(torch.cat([p[0] for p in pieces]), batch)
    assert parts[1].state_dict() == whole.state_dict()  # a checkpoint resumes on any count


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="multiple of 3"):
        Batches(torch.zeros(20, 1, 1, 1, dtype=torch.uint8), 8, rank=0, world=3)


def test_the_views_of_a_part_are_the_rows_of_the_views_of_the_whole_batch():
    """Each process draws the augmentations of the global batch and keeps its rows: the views
    do not depend on the number of processes (every random op on)."""
    spec = ViewSpec(size=12, blur_p=0.5, solarize_p=0.5, grayscale_p=0.5)
    views = MultiView([spec, spec], [ViewSpec(size=6, scale=(0.1, 0.5))])
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    large, small = views(images, torch.Generator().manual_seed(0))
    for rank in range(WORLD):
        rows = slice(rank * 4, (rank + 1) * 4)
        part = views(images[rows], torch.Generator().manual_seed(0), (rank, WORLD))
        for mine, whole in zip(part[0] + part[1], large + small, strict=True):
            torch.testing.assert_close(mine, whole[rows], atol=1e-6, rtol=0)


def _batch_norm_step(rank: int, world: int) -> dict:
    """Our SyncBatchNorm (BatchNorm2d and 1d) on this process's rows of a fixed global batch, a
    loss Σ w·y with fixed weights w: outputs, input gradients, the parameter gradients summed over
    the processes (DDP's sum before its division) and the running statistics afterwards."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=generator) * 3 + 1
    w = torch.randn(8, 3, 4, 4, generator=generator)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.BatchNorm1d(48))
    net = dist.sync_batch_norm(net, torch.device("cpu"))
    with torch.no_grad():  # non-trivial γ, β
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    x_mine = x[mine].clone().requires_grad_()
    y = net(x_mine)
    (y * w[mine].flatten(1)).sum().backward()
    with torch.no_grad():
        net(x[mine])  # a second forward without autograd (a key encoder's)
    grads = [p.grad for p in net.parameters()]
    if world > 1:
        for grad in grads:
            torch.distributed.all_reduce(grad)
    return {
        "y": y.tolist(),
        "x_grad": x_mine.grad.tolist(),
        "param_grads": [g.tolist() for g in grads],
        "buffers": [b.tolist() for b in net.buffers()],
    }


@pytest.mark.slow  # spawns processes
def test_sync_batch_norm_on_two_processes_is_batch_norm_of_the_global_batch():
    reference = _batch_norm_step(0, 1)  # one process: torch's own BatchNorm
    per_process = run_on_processes(_batch_norm_step, WORLD, WORLD)
    for key in ("y", "x_grad"):
        joined = torch.cat([torch.tensor(per_process[r][key]) for r in range(WORLD)])
        torch.testing.assert_close(joined, torch.tensor(reference[key]), atol=1e-5, rtol=1e-5)
    for key in ("param_grads", "buffers"):
        for rank in range(WORLD):
            for got, expected in zip(per_process[rank][key], reference[key], strict=True):
                torch.testing.assert_close(
                    torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=1e-5, msg=key
                )


def _agree(rank: int) -> dict:
    chosen = dist.from_rank0(lambda: f"run-of-rank-{rank}")  # a time-stamped name, say

    def refuse() -> None:
        raise FileExistsError("run folder runs/x exists")

    try:
        dist.from_rank0(refuse)
    except FileExistsError as error:
        return {"chosen": chosen, "error": str(error)}
    return {"chosen": chosen, "error": None}


@pytest.mark.slow  # spawns processes
def test_every_process_gets_rank_0s_choice_and_its_error():
    """One run folder name for all; an error on rank 0 stops the others too, with its message,
    instead of leaving them waiting for rank 0 in the next collective."""
    per_process = run_on_processes(_agree, WORLD)
    for rank in range(WORLD):
        assert per_process[rank] == {"chosen": "run-of-rank-0", "error": "run folder runs/x exists"}


# End to end: MoCo v2 on a ViT (no BN anywhere), its queue filled with the global batch.
RECIPE = {
    "method": {"name": "moco", "dim": 16, "mlp_hidden": 32, "queue_size": 64, "temperature": 0.2},
    "backbone": {"name": "vit_tiny", "patch_size": 8},
    "data": {"name": "synthetic", "per_class": 4, "size": 16},  # 40 images: 5 steps an epoch
    "views": {"name": "simclr", "size": 16, "blur_p": 0.0, "scale": [0.4, 1.0], "strength": 0.5},
    "optim": {"name": "sgd", "lr": 0.1, "batch_size": 8, "warmup_epochs": 0},
    "train": {"epochs": 2, "device": "cpu", "progress": False, "log_every": 1, "knn_every": 0},
}
STOP = 3  # steps before the stop: mid-epoch


def _torchrun(*arguments: str) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={WORLD}", "-m", "selfsup", "train", *arguments]
    result = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1, result.stdout  # rank 0 says it, once


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["method"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: run folder}: one process throughout, two, two then one, one then two."""
    root = tmp_path_factory.mktemp("ddp")
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "out_dir": str(root)}})
    )
    train(str(recipe), ["train.name=one"])
    _torchrun(str(recipe), "train.name=two")
    _torchrun(str(recipe), "train.name=two_then_one", f"train.max_steps={STOP}")
    train(resume=root / "two_then_one", overrides=["train.max_steps=null"])
    train(str(recipe), ["train.name=one_then_two", f"train.max_steps={STOP}"])
    _torchrun("--resume", str(root / "one_then_two"), "train.max_steps=null")
    return {name: root / name for name in ("one", "two", "two_then_one", "one_then_two")}


@pytest.mark.slow  # three torchrun launches of two processes for the tests below
def test_torchrun_writes_one_run_folder_with_one_log_line_per_step(runs):
    folders = [p.name for p in runs["two"].parent.iterdir() if p.is_dir()]
    assert sorted(folders) == sorted(runs)
    lines = [r for r in _records(runs["two"]) if "loss" in r]
    assert [r["step"] for r in lines] == list(range(1, 11))
    assert _records(runs["two"])[0]["processes"] == WORLD


@pytest.mark.slow
@pytest.mark.parametrize("name", ["two", "two_then_one", "one_then_two"])
def test_a_run_on_two_processes_ends_with_the_weights_of_one_process(runs, name):
    """Equal weights after 10 steps need the same data order and views on every rank and across a
    resume with another number of processes, and gradients of the global batch."""
    expected, weights = _weights(runs["one"]), _weights(runs[name])
    assert weights.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], atol=1e-4, rtol=0, msg=key)
    losses = [r["loss"] for r in _records(runs[name]) if "loss" in r]
    expected_losses = [r["loss"] for r in _records(runs["one"]) if "loss" in r]
    assert losses == pytest.approx(expected_losses, abs=1e-4)


def _records(run_dir: Path) -> list[dict]:
    from selfsup.files import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


# Torch's global RNG: one stream per process. SimCLR with a ViT whose stochastic depth draws from it.
STREAMS = {
    "method": {"name": "simclr", "dim": 16, "hidden": 32},
    "backbone": {"name": "vit_tiny", "patch_size": 8, "drop_path": 0.3},
    "data": {"name": "synthetic", "per_class": 4, "size": 16},
    "views": {"name": "simclr", "size": 16, "blur_p": 0.0},
    "optim": {"name": "sgd", "lr": 0.1, "batch_size": 8, "warmup_epochs": 0},
    "train": {"device": "cpu"},
}


def _global_draws(rank: int) -> dict:
    """What torch's global RNG would draw at the start of each of 3 steps' forward (dropout
    masks, sampled negatives), in a run straight through and in one resumed after step 1 from
    rank 0's state (what the checkpoint holds); and a weight, which is every process's."""
    from selfsup.engine.parts import Parts

    torch.set_num_threads(1)
    config = resolve(STREAMS)
    data = load_data(config, "train")

    def build() -> tuple[Parts, list]:
        parts, drawn = Parts.build(config, data), []
        forward = parts.method.forward

        def recording(views: Views, progress: Progress) -> dict:
            with torch.random.fork_rng(devices=[]):  # looks without moving the stream
                drawn.append(torch.rand(4).tolist())
            return forward(views, progress)

        parts.method.forward = recording
        return parts, drawn

    parts, straight = build()
    weight = next(parts.method.parameters()).flatten()[:4].tolist()
    for step in range(3):
        parts.step(step)
    parts, resumed = build()
    parts.step(0)
    state = dist.from_rank0(lambda: {**parts.state_dict(), "step": 1})
    parts, resumed = build()
    assert parts.load_state_dict(state, Path("last.pt")) == 1
    for step in (1, 2):
        parts.step(step)
    return {"straight": straight, "resumed": resumed, "weight": weight}


@pytest.mark.slow  # spawns processes
def test_each_process_draws_its_own_random_stream_and_rank_0_draws_one_process_s():
    """Dropout masks and sampled negatives are independent across processes; rank 0's stream is
    a one-process run's (whose results stay bitwise as they were), and a resumed run on two
    processes draws what the run straight through drew, on every rank."""
    one = _global_draws(0)
    per_process = run_on_processes(_global_draws, WORLD)
    # the same stream, from its start; after the first masks it has moved less on rank 0, which
    # draws one per row of its half of the batch
    assert per_process[0]["straight"][0] == one["straight"][0]
    for step in range(3):
        assert per_process[1]["straight"][step] != per_process[0]["straight"][step]
    for rank in range(WORLD):
        assert per_process[rank]["weight"] == one["weight"]  # built from train.seed everywhere
        assert per_process[rank]["resumed"] == per_process[rank]["straight"][1:]
    assert one["resumed"] == one["straight"][1:]
