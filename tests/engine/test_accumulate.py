"""train.accumulate: a step over M micro-batches equals one step over the whole batch.

The claim (engine/accumulate.py): with gradient caching, every method's loss is the loss of the
whole batch, also where it couples the batch (NT-Xent's negatives, Barlow Twins' and VICReg's
statistics, SwAV's Sinkhorn, MoCo v3's keys, CPC's patches), so loss and gradients equal the large
step's to 1e-5, and the state updates (queues, memory banks, DINO's centre, UniGrad's F) happen
once with the whole batch. BN normalises each micro-batch on its own, so the step test puts it in
eval mode (running statistics), as the DDP test does.
"""

from __future__ import annotations

import pytest
import torch
from gloo import run_on_processes

import selfsup
import selfsup.methods  # noqa: F401  (registers the methods)
from selfsup import dist
from selfsup.build import build_method, build_views, load_data
from selfsup.config import resolve
from selfsup.engine.accumulate import Accumulation, merge
from selfsup.engine.optim import build_optimizer
from selfsup.engine.step import Precision, training_step
from selfsup.methods.base import Method
from selfsup.registry import METHODS as REGISTRY
from selfsup.step import Progress, Views

BATCH = 16
CPU = torch.device("cpu")
INFO = {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25], "num_classes": 10,
        "classes": [str(i) for i in range(10)], "train_size": 40}  # fmt: skip
METHODS = {
    "simclr": {"dim": 16, "hidden": 32, "temperature": 0.5},
    "simclr+memory": {"dim": 16, "hidden": 32, "queue_size": 64, "momentum": 0.9},
    "moco": {"dim": 16, "mlp_hidden": 32, "queue_size": 64, "temperature": 0.2},
    "moco_v3": {"dim": 16, "hidden": 32, "projector_layers": 2},
    "byol": {"dim": 16, "hidden": 32},
    "barlow_twins": {"dim": 32, "hidden": 32},
    "vicreg": {"dim": 32, "hidden": 32},
    "swav": {"dim": 16, "hidden": 32, "num_prototypes": 20},
    "swav+queue": {
        "dim": 16,
        "hidden": 32,
        "num_prototypes": 20,
        "queue_size": 48,
        "queue_start_epoch": 0,
    },
    "dino": {"out_dim": 64, "hidden": 32, "bottleneck": 16},
    "supcon": {"dim": 16, "hidden": 32},
    "invaspread": {"dim": 16},
    "unigrad": {"dim": 16, "hidden": 32},
    "instdisc": {"dim": 16, "loss": "softmax"},
    "cpc": {"patch_size": 8, "patch_stride": 4, "prediction_steps": 1},
    # a 3x3 patch grid predicts 2 rows ahead at most: the predictors of offsets 3 and 4 go
    # unused, which DDP's static graph learns in its first step
    "cpc+far": {"patch_size": 8, "patch_stride": 4, "prediction_steps": 3},
    "cmc": {"views": "crops", "dim": 16, "negatives": "batch"},
}
# Not here: negatives sampled at random (InstDisc's NCE noise, CMC's memory banks, the hybrid's
# uniform bank rows) are drawn per micro-batch, as per process: equal in distribution only.


def _config(name: str):
    method = name.partition("+")[0]
    return resolve(
        {
            "method": {"name": method, **METHODS[name]},
            "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
            "data": {"name": "synthetic", "per_class": 4, "size": 16},
            "views": {
                "name": "swav",
                "size": 16,
                "small_size": 8,
                "blur_p": 0.0,
                "num_small": 2 if REGISTRY.get(method).uses_small_views else 0,
            },
            "optim": {"lr": 0.0, "batch_size": BATCH, "warmup_epochs": 0},
        }
    )


def _setup(name: str, rank: int, world: int, bn_eval: bool) -> tuple:
    """The config, this process's 1/world of a fixed batch's views, and the seeded method."""
    config = _config(name)
    data = load_data(config, "train")
    images, labels = data.images[:BATCH], data.labels[:BATCH]
    large, small = build_views(config, INFO)(images, torch.Generator().manual_seed(0))
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    views = Views(
        [v[mine] for v in large], [v[mine] for v in small], torch.arange(BATCH)[mine], labels[mine]
    )
    torch.manual_seed(0)
    method = build_method(config, INFO).train()
    if bn_eval:
        for module in method.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    return config, views, method


def _step(name: str, accumulate: int, rank: int = 0, world: int = 1, bn_eval: bool = True):
    """One training step on this process's 1/world of a fixed batch in `accumulate`
    micro-batches: the loss, every parameter's gradient and the state after the step."""
    config, views, method = _setup(name, rank, world, bn_eval)
    torch.manual_seed(100)
    out = training_step(
        method,
        build_optimizer(method, config.optim),
        views,
        Progress(0, 0.0, 0.0),
        Precision("fp32", torch.device("cpu")),
        model=dist.data_parallel(method, torch.device("cpu")),
        accumulation=Accumulation(accumulate),
    )
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    return out, grads, {k: v.clone() for k, v in method.state_dict().items()}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = b.abs().max().clamp(min=1)
    error = ((a - b).abs().max() / scale).item() if a.numel() else 0.0
    assert error < 1e-5, f"{what}: differs by {error:.2e} of its scale"


def _rows_sorted(x: torch.Tensor) -> torch.Tensor:
    """The rows of a (K, d) buffer in a fixed order (queues are filled in another row order)."""
    if x.dim() != 2:
        return x
    return x[torch.argsort(x[:, 0] * 1e3 + x[:, -1])]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_four_micro_batches_give_the_loss_gradients_and_state_of_the_whole_batch(name):
    whole_out, whole_grads, whole_state = _step(name, 1)
    out, grads, state = _step(name, 4)
    assert out["loss"].item() == pytest.approx(whole_out["loss"].item(), rel=1e-5, abs=1e-6)
    assert whole_grads, "no parameter received a gradient"
    assert grads.keys() == whole_grads.keys()
    for key in whole_grads:
        _close(grads[key], whole_grads[key], key)
    for key in whole_state:
        a, b = state[key].double(), whole_state[key].double()
        if "queue" in key or ".keys" in key:  # the same keys, pushed in micro-batch order
            a, b = _rows_sorted(a), _rows_sorted(b)
        _close(a, b, key)


def test_a_method_without_gathers_is_plain_accumulation_and_records_nothing():
    accumulation = Accumulation(4)
    config = _config("byol")
    method = build_method(config, INFO)
    images = load_data(config, "train").images[:BATCH].float() / 255
    views = Views([images, images.flip(-1)])
    accumulation.run(method, method, views, Progress(0, 0.0, 0.0), Precision("fp32", CPU))
    assert accumulation.sweeps == 0  # learned: BYOL's loss is a mean over samples


def test_moco_shuffled_keys_need_a_second_recording_sweep():
    """MoCo encodes keys of rows from other micro-batches (shuffled BN across the batch): the
    gathered keys depend on gathered images, so the first sweep's keys are wrong."""
    accumulation = Accumulation(4)
    config = _config("moco")
    method = build_method(config, INFO)
    images = load_data(config, "train").images[:BATCH].float() / 255
    views = Views([images, images.flip(-1)], index=torch.arange(BATCH))
    accumulation.run(method, method, views, Progress(0, 0.0, 0.0), Precision("fp32", CPU))
    assert accumulation.sweeps == 2


def test_batch_norm_running_statistics_take_one_update_per_micro_batch():
    """The recording passes leave no trace: BN's running statistics move M times, as M steps."""
    _, _, state = _step("simclr", 4, bn_eval=False)
    tracked = [v.item() for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert tracked and set(tracked) == {4}


def test_outputs_merge_as_gathers_concatenate():
    outs = [
        {"loss": torch.tensor(1.0), "keys": torch.ones(2, 3), "list": [torch.zeros(2)], "x": 1},
        {"loss": torch.tensor(3.0), "keys": torch.zeros(2, 3), "list": [torch.ones(2)], "x": 2},
    ]
    merged = merge(outs)
    assert merged["loss"].item() == 2.0  # scalars: the mean
    assert torch.equal(merged["keys"], torch.cat([torch.ones(2, 3), torch.zeros(2, 3)]))
    assert torch.equal(merged["list"][0], torch.tensor([0.0, 0, 1, 1]))
    assert merged["x"] == 2


class _Drifting(Method):
    """Breaks the forward contract: what it gathers changes from one call to the next."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Linear(4, 4))
        self.calls = 0

    def forward(self, views: Views, progress: Progress) -> dict[str, torch.Tensor]:
        self.calls += 1
        z = views.global_batch.gather(self.backbone(views.large[0]) + self.calls)
        return {"loss": z.square().mean()}


def test_a_forward_that_is_not_repeatable_is_an_error_not_a_wrong_gradient():
    method = _Drifting()
    views = Views([torch.randn(8, 4)])
    with pytest.raises(RuntimeError, match="train.accumulate"):
        Accumulation(2).run(method, method, views, Progress(0, 0.0, 0.0), Precision("fp32", CPU))


def test_a_batch_that_the_micro_batches_do_not_divide_is_refused(tiny_config):
    tiny_config["train"].update(accumulate=3, max_steps=1)
    with pytest.raises(ValueError, match="train.accumulate=3 does not divide"):
        selfsup.train(resolve(tiny_config))


def test_an_accumulated_run_trains_and_resumes_exactly(tiny_config):
    tiny_config["train"].update(accumulate=2, epochs=2, knn_every=0, name="whole")
    whole = selfsup.train(resolve(tiny_config))
    tiny_config["train"].update(max_steps=3, name="stopped")
    stopped = selfsup.train(resolve(tiny_config))
    resumed = selfsup.train(resume=stopped.path, overrides=["train.max_steps=null"])
    a = selfsup.load(whole.path).method.state_dict()
    b = selfsup.load(resumed.path).method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _two_processes_two_micro_batches(rank: int) -> dict:
    return {
        name: {k: v.tolist() for k, v in _step(name, 2, rank, 2)[1].items()}
        for name in ("simclr", "moco", "swav")
    }


@pytest.mark.slow  # spawns processes
def test_micro_batches_on_two_processes_equal_one_process_on_the_whole_batch():
    per_process = run_on_processes(_two_processes_two_micro_batches, 2)
    for name in ("simclr", "moco", "swav"):
        _, whole_grads, _ = _step(name, 1)
        for rank in range(2):
            grads = per_process[rank][name]
            assert grads.keys() == whole_grads.keys()
            for key, value in grads.items():
                _close(torch.tensor(value), whole_grads[key], f"{name} rank {rank} {key}")


def _exchanges_and_gradients(rank: int) -> dict:
    """Two steps (lr 0: the same gradient each time) on this process's half of the batch, in
    1, 2 and 4 micro-batches, with one `Accumulation` as a run has: the gradient buckets that
    DDP all-reduces in each step (counted by a communication hook) and the second step's
    gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.set_num_threads(1)  # two processes on the test machine's cores
    results = {}
    for name in ("simclr", "cpc+far"):
        for accumulate in (1, 2, 4):
            config, views, method = _setup(name, rank, 2, bn_eval=True)
            model = dist.data_parallel(method, CPU)
            exchanged: list[int] = []

            def counted(state, bucket, exchanged=exchanged):
                exchanged.append(bucket.index())
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counted)
            optimizer = build_optimizer(method, config.optim)
            accumulation = Accumulation(accumulate)
            per_step = []
            for step in range(2):
                before = len(exchanged)
                training_step(
                    method,
                    optimizer,
                    views,
                    Progress(step, 0.0, 0.0),
                    Precision("fp32", CPU),
                    model=model,
                    accumulation=accumulation,
                )
                per_step.append(len(exchanged) - before)
            grads = {k: p.grad.tolist() for k, p in method.named_parameters() if p.grad is not None}
            results[f"{name}/{accumulate}"] = {"exchanges": per_step, "grads": grads}
    return results


@pytest.mark.slow  # spawns processes
def test_gradients_are_exchanged_once_per_step_not_once_per_micro_batch():
    """After the first step (DDP's static graph learns its parameters from a synchronised
    backward pass) M micro-batches all-reduce the gradient buckets once, as one large step does,
    and the gradients are still the whole batch's on one process (CPC: with unused predictors)."""
    per_process = run_on_processes(_exchanges_and_gradients, 2)
    for name in ("simclr", "cpc+far"):
        _, whole_grads, _ = _step(name, 1)
        for rank in range(2):
            plain = per_process[rank][f"{name}/1"]["exchanges"]
            assert plain[1] > 0  # every bucket, once a step
            for accumulate in (2, 4):
                result = per_process[rank][f"{name}/{accumulate}"]
                assert result["exchanges"][1] == plain[1], f"{name}, {accumulate} micro-batches"
                assert result["grads"].keys() == whole_grads.keys()
                for key, value in result["grads"].items():
                    _close(torch.tensor(value), whole_grads[key], f"{name}/{accumulate} {key}")
