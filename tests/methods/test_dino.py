"""DINO: the centre, the teacher temperature, the multi-crop loss without same-crop pairs, the
head's weight-normalised last layer, its frozen first epoch, and the EMA teacher."""

import math

import pytest
import torch

from selfsup.config import OptimConfig, load_config
from selfsup.engine.optim import Schedule, build_optimizer
from selfsup.engine.step import Precision, training_step
from selfsup.heads import DINOHead
from selfsup.methods.dino import DINO
from selfsup.registry import BACKBONES
from selfsup.step import Progress, Views

SMALL = {"out_dim": 16, "hidden": 16, "bottleneck": 4}


def _crops(large=2, small=3, n=6, seed=1):
    """`large` 8-px global crops and `small` 4-px local crops of n one-channel images; each crop
    of each image has its own brightness, so that the crops' outputs differ clearly."""
    generator = torch.Generator().manual_seed(seed)

    def crop(side):
        brightness = 3 * torch.randn(n, 1, 1, 1, generator=generator)
        return torch.randn(n, 1, side, side, generator=generator) + brightness

    return Views([crop(8) for _ in range(large)], [crop(4) for _ in range(small)])


def _cross_entropy(teacher, student, center, teacher_temp, student_temp=0.1):
    """H(P_t, P_s) batch mean, written out: softmaxes as exp / sum exp, in float64."""
    teacher, student, center = teacher.double(), student.double(), center.double()
    p = ((teacher - center) / teacher_temp).exp()
    p = p / p.sum(dim=1, keepdim=True)
    q = (student / student_temp).exp()
    q = q / q.sum(dim=1, keepdim=True)
    return -(p * q.log()).sum(dim=1).mean()


def test_centre_moves_to_the_teacher_batch_mean_with_momentum_0_9_after_the_step(tiny_backbone):
    method = DINO(tiny_backbone, **SMALL).eval()  # eval: one crop at a time = the batch (BN)
    views = _crops()
    with torch.no_grad():
        method.center.copy_(torch.linspace(-1, 1, 16))
    before = method.center.clone()
    progress = Progress(0, 0.0, 0.0)
    out = method(views, progress)
    assert torch.equal(method.center, before)  # forward leaves it: the update is after the step
    with torch.no_grad():
        teacher = torch.cat([method.target(x) for x in views.large])  # (2N, K): global crops only
        method.after_step(progress, out)
    expected = 0.9 * before + 0.1 * teacher.sum(dim=0) / len(teacher)  # c ← m·c + (1 − m)·mean
    torch.testing.assert_close(method.center, expected)
    assert "center" in method.state_dict()  # a persistent buffer: a resumed run keeps it


def test_teacher_temperature_rises_linearly_from_0_04_to_0_07_over_30_epochs_then_stays(
    tiny_backbone,
):
    method = DINO(tiny_backbone, **SMALL)
    expected = {0: 0.04, 7.5: 0.0475, 15: 0.055, 29: 0.069, 30: 0.07, 31: 0.07, 300: 0.07}
    for epoch, temperature in expected.items():
        assert method.teacher_temperature(epoch) == pytest.approx(temperature), epoch
    out = method(_crops(), Progress(150, 15.0, 0.05))
    assert out["teacher_temp"].item() == pytest.approx(0.055)
    constant = DINO(tiny_backbone, **SMALL, final_teacher_temp=0.04, teacher_temp_warmup_epochs=0)
    assert constant.teacher_temperature(0) == constant.teacher_temperature(50) == 0.04


def test_loss_averages_the_cross_entropy_over_pairs_of_different_crops_only(tiny_backbone):
    method = DINO(tiny_backbone, **SMALL).eval()
    views = _crops(large=2, small=3)
    with torch.no_grad():
        method.center.copy_(0.1 * torch.randn(16, generator=torch.Generator().manual_seed(2)))
    loss = method(views, Progress(150, 15.0, 0.05))["loss"]  # τ_t = 0.055 at epoch 15
    crops = views.large + views.small
    with torch.no_grad():
        student = [method.head(method.backbone(x)) for x in crops]  # every crop
        teacher = [method.target(x) for x in views.large]  # the global crops

    def h(i, v):
        return _cross_entropy(teacher[i], student[v], method.center, 0.055)

    pairs = [(i, v) for i in range(2) for v in range(5) if v != i]  # 2 × 4: iq != v
    expected = sum(h(i, v) for i, v in pairs) / len(pairs)
    torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-5, atol=1e-6)
    with_same_crop = sum(h(i, v) for i in range(2) for v in range(5)) / 10
    assert abs(loss.item() - with_same_crop.item()) > 1e-3


def test_teacher_receives_no_gradient_and_the_student_does(tiny_backbone):
    method = DINO(tiny_backbone, **SMALL, freeze_last_layer_epochs=0)
    out = method(_crops(), Progress(0, 0.0, 0.0))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target.parameters())
    assert method.backbone.conv.weight.grad.abs().sum() > 0
    assert method.head.last_layer.weight_v.grad.abs().sum() > 0


def test_teacher_follows_the_student_by_an_ema_whose_momentum_rises_on_a_cosine(tiny_backbone):
    method = DINO(tiny_backbone, **SMALL)
    teacher_before = method.target.copies[1].last_layer.weight_v.clone()  # copies: (backbone, head)
    with torch.no_grad():
        method.head.last_layer.weight_v.add_(1.0)
    progress = Progress(5, 0.5, 0.5)
    out = method(_crops(), progress)
    with torch.no_grad():
        method.after_step(progress, out)
    momentum = 1 - (1 - 0.996) * (math.cos(math.pi * 0.5) + 1) / 2  # λ half-way: 0.998
    expected = momentum * teacher_before + (1 - momentum) * method.head.last_layer.weight_v
    torch.testing.assert_close(method.target.copies[1].last_layer.weight_v, expected)


def test_head_last_layer_has_unit_norm_rows_with_fixed_norms_and_gives_out_dim_cosines():
    torch.manual_seed(0)
    head = DINOHead(8, 32, hidden=16, bottleneck=4)
    x = torch.randn(5, 8)
    y = head(x)
    assert y.shape == (5, 32)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))
    assert not head.last_layer.weight_g.requires_grad  # g fixed at 1 (norm_last_layer)
    z = head.mlp(x)
    z = z / z.norm(dim=1, keepdim=True)  # the L2 bottleneck
    v = head.last_layer.weight_v
    torch.testing.assert_close(y, z @ (v / v.norm(dim=1, keepdim=True)).T)  # cosines to the rows
    with torch.no_grad():
        head.last_layer.weight_v.mul_(3.0)  # the rows' lengths do not matter
    torch.testing.assert_close(head(x), y)
    trained_norms = DINOHead(8, 32, hidden=16, bottleneck=4, norm_last_layer=False)
    assert trained_norms.last_layer.weight_g.requires_grad


def test_head_state_dict_has_the_official_names_and_round_trips():
    torch.manual_seed(0)
    head = DINOHead(8, 32, hidden=16, bottleneck=4)
    names = {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert set(head.state_dict()) == names | {"last_layer.weight_g", "last_layer.weight_v"}
    torch.manual_seed(1)
    other = DINOHead(8, 32, hidden=16, bottleneck=4)
    other.load_state_dict(head.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(other(x), head(x), rtol=0, atol=0)


def test_last_layer_does_not_move_during_the_first_epoch_then_trains(tiny_backbone):
    method = DINO(tiny_backbone, **SMALL)  # freeze_last_layer_epochs=1
    config = OptimConfig(name="adamw", lr=0.01, weight_decay=0.04, final_weight_decay=0.4,
                         warmup_epochs=0, clip=3.0)  # fmt: skip
    optimizer = build_optimizer(method, config)
    schedule = Schedule(optimizer, config, steps_per_epoch=2, total_steps=10)
    last = method.head.last_layer.weight_v.detach().clone()
    first = method.head.mlp[0].weight.detach().clone()
    views = _crops()

    def step(k):
        schedule.apply(k)
        progress = Progress(k, k / 2, k / 10)
        precision = Precision("fp32", torch.device("cpu"))
        training_step(method, optimizer, views, progress, precision, config.clip, schedule)

    for k in range(2):  # the first epoch
        step(k)
    assert torch.equal(method.head.last_layer.weight_v, last)  # no gradient, momentum or decay
    assert method.head.last_layer.weight_v not in optimizer.state
    assert not torch.equal(method.head.mlp[0].weight, first)
    step(2)
    assert not torch.equal(method.head.last_layer.weight_v, last)


def test_teacher_has_no_stochastic_depth_while_the_student_keeps_it():
    torch.manual_seed(0)
    config = {"name": "vit_tiny", "patch_size": 8, "drop_path": 0.1}
    backbone = BACKBONES.build(config, in_channels=1, image_size=16)
    method = DINO(backbone, **SMALL)
    assert max(block.drop_path for block in method.backbone.blocks) == pytest.approx(0.1)
    assert all(block.drop_path == 0.0 for block in method.target.copies[0].blocks)


def test_dino_runs_multi_crop_on_resnet_and_vit_backbones(real_backbone, progress):
    method = DINO(real_backbone, out_dim=32, hidden=16, bottleneck=8)
    generator = torch.Generator().manual_seed(0)
    views = Views(
        [torch.randn(4, 1, 16, 16, generator=generator) for _ in range(2)],
        [torch.randn(4, 1, 8, 8, generator=generator) for _ in range(2)],
    )
    out = method(views, progress)
    out["loss"].backward()
    with torch.no_grad():
        method.after_step(progress, out)
    assert torch.isfinite(out["loss"]) and {"teacher_entropy", "teacher_temp"} <= set(out)
    assert 0 < out["teacher_entropy"] <= math.log(32) + 1e-4
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in real_backbone.parameters())


RECIPES = ["fashion_mnist", "fashion_mnist_vit", "imagenet", "imagenet_vit"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_dino_recipes_resolve_and_build(recipe, tiny_backbone):
    config = load_config(f"dino/{recipe}")
    settings = {key: value for key, value in config.method.items() if key != "name"}
    method = DINO(tiny_backbone, **settings)
    assert method.center.shape == (settings["out_dim"],)
