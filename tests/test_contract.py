"""The method contract, checked on every registered method with a ResNet and a ViT backbone.

A method added to the registry is tested here without editing this file: two training steps with
a finite loss, gradient reaching the encoder, forward without side effects, a state-dict round
trip, exact resume, and the encoder's output shape.
"""

import copy
import json

import pytest
import torch
import yaml

import selfsup.methods  # noqa: F401  (registers the methods)
from selfsup.build import FROM_RUNS, build_method, build_views, load_data
from selfsup.config import resolve
from selfsup.engine.optim import Schedule, build_optimizer
from selfsup.engine.step import Precision, training_step
from selfsup.registry import METHODS
from selfsup.step import Progress, Views

BACKBONES = {
    "resnet": {"name": "resnet18", "stem": "small", "width": 0.125},
    "vit": {"name": "vit_tiny", "patch_size": 8},
}
INFO = {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25], "num_classes": 10,
        "classes": [str(i) for i in range(10)], "train_size": 40}  # fmt: skip
SOURCE_METHODS = {"pretrained": "simclr", "teacher": "supervised"}  # what those runs trained
# Settings a method needs on these 16-px images (its defaults are its paper's, for 224 px)
SMALL_IMAGE_SETTINGS = {"cpc": {"patch_size": 8, "patch_stride": 4}}  # a 3x3 patch grid
# Heads at a test's size: the papers' 8192-wide projectors and 65536-d DINO outputs take a minute
# and gigabytes per case, and the contract does not depend on their width.
SMALL_HEADS = {
    "barlow_twins": {"dim": 256, "hidden": 256},
    "vicreg": {"dim": 256, "hidden": 256},
    "dino": {"out_dim": 1024, "hidden": 256, "bottleneck": 64},
    "unigrad": {"dim": 256, "hidden": 256},
    "swav": {"num_prototypes": 100, "hidden": 256},
}
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _config(method, backbone, tmp_path):
    raw = {
        "method": {
            "name": method,
            **SMALL_IMAGE_SETTINGS.get(method, {}),
            **SMALL_HEADS.get(method, {}),
        },
        "backbone": BACKBONES[backbone],
        "data": {"name": "synthetic", "per_class": 4, "size": 16},
        # two 16-px global crops, and two 8-px local crops for a method that trains on them
        "views": {
            "name": "swav",
            "size": 16,
            "small_size": 8,
            "blur_p": 0.0,
            "num_small": 2 if METHODS.get(method).uses_small_views else 0,
        },
        "optim": {"lr": 0.05, "batch_size": 16, "warmup_epochs": 0},
    }
    for parameter, (key, _) in FROM_RUNS.items():  # a run to start from: its copy in tmp_path
        if parameter in _wanted(method):
            source = tmp_path / key
            source.mkdir(exist_ok=True)
            source_config = resolve({**raw, "method": {"name": SOURCE_METHODS[parameter]}})
            (source / "config.yaml").write_text(yaml.safe_dump(source_config.to_dict()))
            (source / "data.json").write_text(json.dumps(INFO))
            raw.setdefault("train", {})[key] = str(tmp_path)
    return resolve(raw)


def _wanted(method):
    from selfsup.registry import parameters

    return parameters(METHODS.get(method))


class Setup:
    def __init__(self, config, tmp_path, seed=0):
        torch.manual_seed(seed)
        self.method = build_method(config, INFO, tmp_path).train()
        self.optimizer = build_optimizer(self.method, config.optim)
        self.schedule = Schedule(self.optimizer, config.optim, 2, 10)

    def step(self, step, views):
        torch.manual_seed(100 + step)  # methods may draw from the global RNG (shuffled BN)
        self.schedule.apply(step)
        return training_step(
            self.method, self.optimizer, views, Progress(step, step / 2, step / 10),
            Precision("fp32", torch.device("cpu")), schedule=self.schedule,
        )  # fmt: skip


def _batches(config, with_labels, n=3):
    data = load_data(config, "train")
    views = build_views(config, INFO)
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        index = torch.arange(16) + 8 * i
        large, small = views(data.images[index], generator)
        out.append(Views(large, small, index, data.labels[index] if with_labels else None))
    return out


def _own_state(method):
    """The method's state without BN running statistics (those move in any train-mode forward)."""
    return {
        k: v.detach().clone()
        for k, v in method.state_dict().items()
        if not k.endswith(BN_STATISTICS)
    }


def _equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=0), key


@pytest.fixture(params=sorted(BACKBONES))
def backbone(request):
    return request.param


@pytest.mark.parametrize("name", METHODS.names())
def test_method_keeps_the_contract(name, backbone, tmp_path):
    config = _config(name, backbone, tmp_path)
    # as in the engine: a method that trains without labels never sees them
    batches = _batches(config, with_labels=METHODS.get(name).uses_labels)

    setup = Setup(config, tmp_path)
    method = setup.method

    # forward changes no state of the method's own: twice is the same as once, or not at all
    before = _own_state(method)
    for _ in range(2):
        method(batches[0], Progress(0, 0.0, 0.0))
    _equal(before, _own_state(method))

    # two training steps: finite losses, the encoder receives gradient
    for step in range(2):
        out = setup.step(step, batches[step])
        assert torch.isfinite(out["loss"]), (name, step)
        grads = [p.grad for p in method.encoder.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reached the encoder"

    # the encoder gives (N, num_features)
    x = batches[0].large[0]
    method.eval()
    with torch.no_grad():
        features = method.encoder(x)
    assert features.shape == (len(x), method.encoder.num_features)

    # state-dict round trip: another seed's method with this state computes the same
    other = Setup(config, tmp_path, seed=1).method.eval()
    other.load_state_dict(method.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other.encoder(x), features, rtol=0, atol=0)

    # exact resume: step 2 after restoring (method, optimizer) equals step 2 straight on
    method.train()
    state = copy.deepcopy(
        {"method": method.state_dict(), "optimizer": setup.optimizer.state_dict()}
    )
    setup.step(2, batches[2])
    resumed = Setup(config, tmp_path, seed=2)
    resumed.method.load_state_dict(state["method"])
    resumed.optimizer.load_state_dict(state["optimizer"])
    resumed.step(2, batches[2])
    _equal(method.state_dict(), resumed.method.state_dict(), atol=1e-6)
