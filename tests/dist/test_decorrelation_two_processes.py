"""Barlow Twins' and VICReg's losses on two real gloo processes on CPU, against one process.

Both losses are statistics of the whole batch (a cross-correlation, variances, covariances), so
the methods compute them on `gather`ed embeddings (dist/collectives.py), as SimCLR does for NT-Xent
(tests/dist/test_gather_two_processes.py). Checked here for each loss, with 2 processes of 3 rows: every
process computes the loss of the 6-row global batch; each process's input gradient is world_size x
its slice of the one-process gradient; after DDP's averaging the weight gradients equal the
one-process ones. The loss of a process's own 3 rows differs: the gathering matters.

The two processes are spawned once for the module (a few seconds); each test reads their results.
"""

from __future__ import annotations

import pytest
import torch
from gloo import run_on_processes
from torch import nn

from selfsup.dist import gather
from selfsup.losses import barlow_twins, cross_correlation, vicreg_terms

pytestmark = pytest.mark.slow  # spawns processes, as test_gather_two_processes.py

WORLD = 2
ROWS = 3  # per process


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    return barlow_twins(cross_correlation(z1, z2), 0.0051)  # as BarlowTwins.forward


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    invariance, variance, covariance = vicreg_terms(z1, z2)
    return 25 * invariance + 25 * variance + covariance  # as VICReg.forward


LOSSES = {"barlow_twins": barlow_twins_loss, "vicreg": vicreg_loss}


def make_inputs() -> dict[str, torch.Tensor]:
    """The global batch of both views (WORLD * ROWS rows); process r holds rows r*ROWS..."""
    generator = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(WORLD * ROWS, 5, generator=generator),
        "b": torch.randn(WORLD * ROWS, 5, generator=generator),
    }


def make_layer() -> nn.Linear:
    """The same initial weights on every process and in the one-process reference."""
    torch.manual_seed(1)
    return nn.Linear(5, 4)


def _on_each_process(rank: int, inputs: dict) -> dict:
    import torch.distributed as dist

    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    out = {}
    for name, loss_fn in LOSSES.items():
        layer = make_layer()
        a = inputs["a"][mine].clone().requires_grad_()
        b = inputs["b"][mine].clone().requires_grad_()
        za, zb = layer(a), layer(b)
        with torch.no_grad():
            out[f"{name}_local_loss"] = loss_fn(za, zb).item()  # this process's rows only
        loss = loss_fn(gather(za), gather(zb))
        loss.backward()
        out[f"{name}_loss"] = loss.item()
        out[f"{name}_a_grad"], out[f"{name}_b_grad"] = a.grad.tolist(), b.grad.tolist()
        for param in layer.parameters():  # what DistributedDataParallel does to .grad
            dist.all_reduce(param.grad)
            param.grad /= WORLD
        out[f"{name}_param_grads"] = [p.grad.tolist() for p in layer.parameters()]
    return out  # plain lists: no shared memory outliving the worker


@pytest.fixture(scope="module")
def per_process():
    """{rank: results} from WORLD spawned gloo processes running `_on_each_process`."""
    return run_on_processes(_on_each_process, WORLD, make_inputs())


def my_rows(rank: int) -> slice:
    return slice(rank * ROWS, (rank + 1) * ROWS)


def full_batch(name: str):
    """The same loss on the global batch in one process: (loss, layer, a, b) after backward."""
    inputs, layer = make_inputs(), make_layer()
    a, b = inputs["a"].clone().requires_grad_(), inputs["b"].clone().requires_grad_()
    loss = LOSSES[name](layer(a), layer(b))
    loss.backward()
    return loss, layer, a, b


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_process_computes_the_full_batch_loss_not_its_own_rows(per_process, name):
    loss, *_ = full_batch(name)
    for rank in range(WORLD):
        assert per_process[rank][f"{name}_loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert per_process[rank][f"{name}_local_loss"] != pytest.approx(loss.item(), rel=1e-3)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gather_input_gradients_are_world_size_times_the_full_batch_slice(per_process, name):
    _, _, a, b = full_batch(name)
    for rank in range(WORLD):
        rows = my_rows(rank)
        a_grad, b_grad = (torch.tensor(per_process[rank][f"{name}_{x}_grad"]) for x in "ab")
        torch.testing.assert_close(a_grad, WORLD * a.grad[rows])
        torch.testing.assert_close(b_grad, WORLD * b.grad[rows])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ddp_averaged_weight_gradients_equal_the_one_process_full_batch_gradient(per_process, name):
    _, layer, _, _ = full_batch(name)
    expected = [p.grad for p in layer.parameters()]  # weight, bias
    for rank in range(WORLD):
        grads = [torch.tensor(g) for g in per_process[rank][f"{name}_param_grads"]]
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want)
