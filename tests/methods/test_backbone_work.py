"""benchmarks/throughput.py's efficiency reference: the backbone work each method really does."""

import sys
from pathlib import Path

import pytest

from selfsup.methods.byol import BYOL
from selfsup.methods.moco import MoCo
from selfsup.methods.simclr import SimCLR
from selfsup.methods.simsiam import SimSiam
from selfsup.step import Views

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from throughput import backbone_calls  # noqa: E402


def _work(method, views, progress):
    calls = backbone_calls(method, lambda: method(Views(views), progress)["loss"].backward())
    with_grad = sum(shape[0] for _, shape, grad in calls if grad)
    without = sum(shape[0] for _, shape, grad in calls if not grad)
    return with_grad, without


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda b: SimCLR(b, dim=4, hidden=8), (12, 0)),  # both views, with gradient
        (lambda b: SimSiam(b, dim=4, hidden=8, predictor_hidden=2), (12, 0)),  # target = online
        # the query view with gradient, the key view through the key encoder without
        (lambda b: MoCo(b, dim=4, queue_size=16, shuffle_bn_groups=2), (6, 6)),
        # both views online with gradient, both again through the EMA target without
        (lambda b: BYOL(b, dim=4, hidden=8), (12, 12)),
    ],
    ids=["simclr", "simsiam", "moco", "byol"],
)
def test_backbone_work_counts_gradient_and_forward_only_images(
    make, expected, tiny_backbone, two_views, progress
):
    assert _work(make(tiny_backbone), two_views, progress) == expected


def test_backbone_work_sees_moco_key_batch_split_into_its_bn_groups(
    tiny_backbone, two_views, progress
):
    method = MoCo(tiny_backbone, dim=4, queue_size=16, shuffle_bn_groups=3)
    calls = backbone_calls(method, lambda: method(Views(two_views), progress)["loss"].backward())
    assert [(shape[0], grad) for _, shape, grad in calls] == [
        (6, True),
        (2, False),
        (2, False),
        (2, False),
    ]
