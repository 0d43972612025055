"""selfsup.dist's gathers on two real gloo processes on CPU, against one-process computations.

`gather`'s promise (dist/collectives.py, `_Gather.backward`): every process computes the same
loss on the gathered batch; the backward all-reduces (sums) the incoming gradient and keeps this
process's rows. Each process's input gradient is therefore world_size x its slice of the full-batch
gradient, and DDP's averaging over world_size processes then gives exactly the gradient of the
loss on the global batch computed in one process. Both halves of that claim are checked.

The two processes are spawned once for the module (a few seconds); each test reads their results.
"""

from __future__ import annotations

import pytest
import torch
from gloo import run_on_processes
from torch import nn

from selfsup.dist import gather, gather_nograd
from selfsup.losses import nt_xent

pytestmark = pytest.mark.slow  # spawns processes, as the shuffled-BN test in test_mechanisms.py

WORLD = 2
ROWS = 3  # per process
TEMPERATURE = 0.5


def make_inputs() -> dict[str, torch.Tensor]:
    """The global batch (WORLD * ROWS rows of each input); process r holds rows r*ROWS..."""
    generator = torch.Generator().manual_seed(0)
    return {
        "rows": torch.arange(WORLD * ROWS * 2, dtype=torch.float32).view(WORLD * ROWS, 2),
        "x": torch.randn(WORLD * ROWS, 4, generator=generator),
        "weights": torch.randn(WORLD * ROWS, 4, generator=generator),  # no two rows alike
        "a": torch.randn(WORLD * ROWS, 5, generator=generator),
        "b": torch.randn(WORLD * ROWS, 5, generator=generator),
    }


def make_layer() -> nn.Linear:
    """The same initial weights on every process and in the one-process reference."""
    torch.manual_seed(1)
    return nn.Linear(5, 3)


def _on_each_process(rank: int, inputs: dict) -> dict:
    import torch.distributed as dist

    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    out = {}
    rows = inputs["rows"][mine].clone().requires_grad_()
    collected = gather_nograd(rows)
    out["nograd"] = collected.tolist()
    out["nograd_requires_grad"] = collected.requires_grad

    # a weighted sum with known weights: d loss / d gathered = weights
    x = inputs["x"][mine].clone().requires_grad_()
    gathered = gather(x)
    out["gathered"] = gathered.tolist()
    (inputs["weights"] * gathered).sum().backward()
    out["x_grad"] = x.grad.tolist()

    # SimCLR's use: nt_xent on gathered embeddings of a shared layer, then DDP's averaging
    layer = make_layer()
    a = inputs["a"][mine].clone().requires_grad_()
    b = inputs["b"][mine].clone().requires_grad_()
    loss = nt_xent(gather(layer(a)), gather(layer(b)), TEMPERATURE)
    loss.backward()
    out["loss"] = loss.item()
    out["a_grad"], out["b_grad"] = a.grad.tolist(), b.grad.tolist()
    for param in layer.parameters():  # what DistributedDataParallel does to .grad
        dist.all_reduce(param.grad)
        param.grad /= WORLD
    out["param_grads"] = [p.grad.tolist() for p in layer.parameters()]
    return out  # plain lists: no shared memory outliving the worker


@pytest.fixture(scope="module")
def per_process():
    """{rank: results} from WORLD spawned gloo processes running `_on_each_process`."""
    return run_on_processes(_on_each_process, WORLD, make_inputs())


def my_rows(rank: int) -> slice:
    return slice(rank * ROWS, (rank + 1) * ROWS)


def test_gather_nograd_returns_every_process_rows_in_rank_order_on_each_process(per_process):
    expected = make_inputs()["rows"]  # rank 0's rows, then rank 1's
    for rank in range(WORLD):
        assert torch.equal(torch.tensor(per_process[rank]["nograd"]), expected)


def test_gather_nograd_carries_no_gradient(per_process):
    assert not any(per_process[rank]["nograd_requires_grad"] for rank in range(WORLD))


def test_gather_returns_the_global_batch_in_rank_order_on_each_process(per_process):
    for rank in range(WORLD):
        assert torch.equal(torch.tensor(per_process[rank]["gathered"]), make_inputs()["x"])


def test_gather_gives_each_process_world_size_times_its_slice_of_a_known_gradient(per_process):
    # loss = sum(weights * gathered): its gradient on the global batch is `weights`; every
    # process computed that same loss, so the all-reduce sums WORLD equal copies of it.
    weights = make_inputs()["weights"]
    for rank in range(WORLD):
        grad = torch.tensor(per_process[rank]["x_grad"])
        torch.testing.assert_close(grad, WORLD * weights[my_rows(rank)])


def full_batch_nt_xent():
    """The same loss on the global batch in one process: (loss, layer, a, b) after backward."""
    inputs, layer = make_inputs(), make_layer()
    a, b = inputs["a"].clone().requires_grad_(), inputs["b"].clone().requires_grad_()
    loss = nt_xent(layer(a), layer(b), TEMPERATURE)
    loss.backward()
    return loss, layer, a, b


def test_every_process_computes_the_full_batch_nt_xent(per_process):
    loss, *_ = full_batch_nt_xent()
    for rank in range(WORLD):
        assert per_process[rank]["loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_gather_input_gradients_are_world_size_times_the_full_batch_nt_xent_slice(per_process):
    _, _, a, b = full_batch_nt_xent()
    for rank in range(WORLD):
        rows = my_rows(rank)
        torch.testing.assert_close(torch.tensor(per_process[rank]["a_grad"]), WORLD * a.grad[rows])
        torch.testing.assert_close(torch.tensor(per_process[rank]["b_grad"]), WORLD * b.grad[rows])


def test_ddp_averaged_weight_gradients_equal_the_one_process_full_batch_gradient(per_process):
    _, layer, _, _ = full_batch_nt_xent()
    expected = [p.grad for p in layer.parameters()]  # weight, bias
    for rank in range(WORLD):
        grads = [torch.tensor(g) for g in per_process[rank]["param_grads"]]
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want)
