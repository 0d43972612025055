"""Optimizers, parameter groups and their schedules, checked against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from selfsup.config import OptimConfig, resolve
from selfsup.engine.optim import LARS, Schedule, build_optimizer
from selfsup.engine.step import Precision, training_step
from selfsup.methods.base import Method
from selfsup.params import Group
from selfsup.step import Progress, Views


class Regression(Method):
    """A backbone (conv + BN) and a linear head fitted to zero: the smallest method with groups."""

    def __init__(self, groups: dict[str, Group] | None = None) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten()))
        self.head = nn.Linear(4 * 6 * 6, 2)
        self.groups = groups or {}

    def forward(self, views, progress):
        return {"loss": self.head(self.backbone(views.large[0])).pow(2).mean()}

    def parameter_groups(self):
        return self.groups


def _steps(method, config, steps, steps_per_epoch=2, total=10):
    optimizer = build_optimizer(method, config)
    schedule = Schedule(optimizer, config, steps_per_epoch, total)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for step in steps:
        schedule.apply(step)
        progress = Progress(step, step / steps_per_epoch, step / total)
        training_step(
            method, optimizer, Views([x]), progress, Precision("fp32", torch.device("cpu")),
            schedule=schedule,
        )  # fmt: skip
    return optimizer


def test_lars_scales_each_update_by_the_trust_ratio_by_hand():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    optimizer = LARS([w], lr=1.0, momentum=0.9, weight_decay=0.1, eta=0.001)
    w.grad = torch.tensor([0.6, 0.8])
    optimizer.step()
    # update = g + wd·w = (0.9, 1.2), ||update|| = 1.5, trust = 0.001 · 5 / 1.5 = 1/300
    torch.testing.assert_close(w.data, torch.tensor([3.0 - 0.9 / 300, 4.0 - 1.2 / 300]))
    w1 = w.data.clone()
    w.grad = torch.tensor([0.6, 0.8])
    optimizer.step()
    update = torch.tensor([0.6, 0.8]) + 0.1 * w1
    trust = 0.001 * w1.norm() / update.norm()
    buffer = 0.9 * torch.tensor([0.9, 1.2]) / 300 + trust * update  # heavy-ball momentum
    torch.testing.assert_close(w.data, w1 - buffer)


@pytest.mark.parametrize(("lr", "expected_step"), [(1.0, 0.01 * 5 / 1.5), (0.02, 0.02)])
def test_lars_clip_mode_steps_by_the_smaller_of_the_trust_ratio_and_lr(lr, expected_step):
    """LARC's clip mode (solo-learn's clip_lr): the step is min(eta·||w||/||g + wd·w||, lr)·u."""
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    optimizer = LARS([w], lr=lr, momentum=0.9, weight_decay=0.1, eta=0.01, clip=True)
    w.grad = torch.tensor([0.6, 0.8])
    optimizer.step()
    # u = g + wd·w = (0.9, 1.2), ||u|| = 1.5; eta·||w||/||u|| = 1/30 against lr 1.0 or 0.02
    update = torch.tensor([0.9, 1.2])
    torch.testing.assert_close(w.data, torch.tensor([3.0, 4.0]) - expected_step * update)


def test_lars_leaves_norms_and_biases_unadapted_and_undecayed():
    config = OptimConfig(name="lars", weight_decay=0.5)
    optimizer = build_optimizer(Regression(), config)
    for group in optimizer.param_groups:
        one_dim = all(p.ndim <= 1 for p in group["params"])
        assert group["lars"] is not one_dim and (group["weight_decay"] == 0) is one_dim


def test_warmup_then_cosine_gives_the_formula_at_chosen_steps():
    config = OptimConfig(lr=0.2, batch_size=512, warmup_epochs=1, final_lr=0.001)  # peak 0.4
    schedule = Schedule(build_optimizer(Regression(), config), config, 10, 110)
    expected = {
        0: 0.4 * 1 / 10,  # linear warm-up from ~0 over the first epoch
        4: 0.4 * 5 / 10,
        9: 0.4,
        10: 0.4,  # cosine starts at the peak ...
        60: 0.001 + (0.4 - 0.001) * 0.5,  # ... is half-way at the middle of the decay ...
        109: 0.001 + (0.4 - 0.001) * 0.5 * (1 + math.cos(math.pi * 99 / 100)),  # ... ends at final
    }
    for step, lr in expected.items():
        assert schedule.learning_rate(step) == pytest.approx(lr), step
    constant = OptimConfig(lr=0.2, batch_size=512, warmup_epochs=1, schedule="constant")
    schedule = Schedule(build_optimizer(Regression(), constant), constant, 10, 110)
    assert schedule.learning_rate(60) == schedule.learning_rate(109) == pytest.approx(0.4)


def test_the_linear_schedule_falls_in_a_straight_line_from_the_peak_to_final_lr():
    config = OptimConfig(lr=0.2, batch_size=512, warmup_epochs=1, final_lr=0.001, schedule="linear")
    schedule = Schedule(build_optimizer(Regression(), config), config, 10, 110)
    expected = {
        4: 0.4 * 5 / 10,  # the same warm-up
        10: 0.4,
        35: 0.4 - (0.4 - 0.001) * 25 / 100,  # a quarter of the decay: a quarter of the way down
        60: 0.001 + (0.4 - 0.001) / 2,
        109: 0.4 - (0.4 - 0.001) * 99 / 100,
    }
    for step, lr in expected.items():
        assert schedule.learning_rate(step) == pytest.approx(lr), step


def test_a_fixed_lr_group_keeps_its_peak_lr_through_warmup_and_decay():
    method = Regression({"head": Group(fixed_lr=True, lr=0.05)})
    config = OptimConfig(lr=0.1, batch_size=256, warmup_epochs=1)
    optimizer = build_optimizer(method, config)
    schedule = Schedule(optimizer, config, 10, 100)
    head = {id(p) for p in method.head.parameters()}
    for step in (0, 3, 50, 99):
        schedule.apply(step)
        for group in optimizer.param_groups:
            in_head = {id(p) for p in group["params"]} <= head
            assert group["lr"] == pytest.approx(0.05 if in_head else schedule.learning_rate(step))


def test_a_frozen_group_does_not_move_during_its_period_then_trains():
    method = Regression({"head": Group(frozen_epochs=1.5)})  # 3 steps at 2 steps per epoch
    config = OptimConfig(lr=0.1, weight_decay=0.1, warmup_epochs=0)
    head, conv = method.head.weight.detach().clone(), method.backbone[0].weight.detach().clone()
    optimizer = _steps(method, config, range(3))
    assert torch.equal(method.head.weight, head)  # no gradient, momentum or decay reached it
    assert method.head.weight not in optimizer.state  # no momentum gathered while frozen
    assert not torch.equal(method.backbone[0].weight, conv)
    _steps(method, config, [3])
    assert not torch.equal(method.head.weight, head)


def test_a_group_frozen_for_good_never_moves():
    method = Regression({"head": Group(frozen_epochs=float("inf"))})
    head = method.head.weight.detach().clone()
    _steps(method, OptimConfig(lr=0.1, warmup_epochs=0), range(4))
    assert torch.equal(method.head.weight, head)


def test_no_decay_where_a_group_says_so_and_decay_elsewhere_is_exact():
    method = Regression({"head": Group(weight_decay=0.0)})
    method.head.weight.register_hook(lambda g: torch.zeros_like(g))  # decay is the only force
    method.backbone[0].weight.register_hook(lambda g: torch.zeros_like(g))
    bias, head, conv = (p.detach().clone() for p in (method.head.bias, method.head.weight,
                                                      method.backbone[0].weight))  # fmt: skip
    config = OptimConfig(lr=0.1, lr_scaling="none", weight_decay=0.5, warmup_epochs=0,
                         schedule="constant", momentum=0.0)  # fmt: skip
    _steps(method, config, [0])
    assert torch.equal(method.head.weight, head)  # the group said weight_decay 0
    torch.testing.assert_close(method.backbone[0].weight, conv * (1 - 0.1 * 0.5))  # w − lr·wd·w
    assert not torch.equal(method.head.bias, bias)  # biases still follow their gradient, undecayed


def test_norms_and_biases_are_decayed_when_the_recipe_says_so():
    config = OptimConfig(weight_decay=0.5, decay_norms_and_biases=True)
    optimizer = build_optimizer(Regression(), config)
    assert all(group["weight_decay"] == 0.5 and group["lars"] for group in optimizer.param_groups)


def test_weight_decay_follows_a_cosine_from_start_to_final_value():
    config = OptimConfig(weight_decay=0.04, final_weight_decay=0.4)  # DINO's schedule
    optimizer = build_optimizer(Regression(), config)
    schedule = Schedule(optimizer, config, 10, 100)
    decayed = [g for g in optimizer.param_groups if g["lars"]]
    for step in (0, 25, 50, 100):
        schedule.apply(step)
        expected = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * step / 100))
        assert all(g["weight_decay"] == pytest.approx(expected) for g in decayed)


def test_a_recipe_group_replaces_the_methods_group_of_that_prefix():
    method = Regression({"head": Group(fixed_lr=True)})
    optimizer = build_optimizer(method, OptimConfig(groups={"head": Group(lr=0.01)}))
    head = [g for g in optimizer.param_groups if g["name"] == "head"]
    assert head and all(not g["fixed_lr"] and g["peak_lr"] == pytest.approx(0.01) for g in head)


def test_recipe_groups_are_validated_with_a_clear_error(tiny_config):
    tiny_config["optim"]["groups"] = {"projector": {"lr": 0.1, "fixd_lr": True}}
    with pytest.raises(
        ValueError, match=r"optim.groups.projector.fixd_lr.*did you mean 'fixed_lr'"
    ):
        resolve(tiny_config)
    tiny_config["optim"]["groups"] = {"projector": {"frozen_epochs": -1}}
    with pytest.raises(ValueError, match="frozen_epochs=-1.0 \\(need >= 0\\)"):
        resolve(tiny_config)
    config = resolve({**tiny_config, "optim": {"groups": {"predictor": {"lr": 0.1}}}})
    method = Regression()
    with pytest.raises(
        ValueError, match="'predictor' names no trainable parameter.*backbone, head"
    ):
        build_optimizer(method, config.optim)


def _is_norm_or_bias(group: dict) -> bool:
    return all(p.ndim <= 1 for p in group["params"])


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_norms_and_biases_stay_undecayed_through_the_whole_weight_decay_schedule(name):
    # DINO's cosine 0.04 -> 0.4 by default, and a group with a cosine of its own
    method = Regression({"head": Group(weight_decay=0.1, final_weight_decay=0.3)})
    config = OptimConfig(name=name, weight_decay=0.04, final_weight_decay=0.4)
    optimizer = build_optimizer(method, config)
    total = 20
    schedule = Schedule(optimizer, config, 5, total)
    exempt = [g for g in optimizer.param_groups if _is_norm_or_bias(g)]
    decayed = [g for g in optimizer.param_groups if not _is_norm_or_bias(g)]
    assert {g["name"] for g in exempt} == {g["name"] for g in decayed} == {"default", "head"}
    for step in range(total + 1):  # every step, and the schedule's end
        schedule.apply(step)
        for group in exempt:
            assert group["weight_decay"] == 0.0 and not group["lars"], (step, group["name"])
        for group in decayed:
            start, end = (0.1, 0.3) if group["name"] == "head" else (0.04, 0.4)
            expected = end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / total))
            assert group["weight_decay"] == pytest.approx(expected), (step, group["name"])
            assert group["lars"]


def test_norms_and_biases_do_not_shrink_while_the_weights_decay_on_a_cosine():
    method = Regression()
    for p in method.parameters():
        p.register_hook(torch.zeros_like)  # decay is the only force
    before = {k: p.detach().clone() for k, p in method.named_parameters()}
    config = OptimConfig(lr=0.1, lr_scaling="none", weight_decay=0.1, final_weight_decay=0.5,
                         warmup_epochs=0, schedule="constant", momentum=0.0)  # fmt: skip
    total = 6
    _steps(method, config, range(total), total=total)
    decay = [  # wd_t: a cosine from 0.1 to 0.5 over the run
        0.5 + (0.1 - 0.5) * 0.5 * (1 + math.cos(math.pi * step / total)) for step in range(total)
    ]
    shrink = math.prod(1 - 0.1 * wd for wd in decay)
    for key, p in method.named_parameters():
        if p.ndim <= 1:  # BN's weight and bias, the biases: all but BN's bias start non-zero
            assert torch.equal(p, before[key]), key
        else:  # w_t+1 = (1 − lr·wd_t) w_t
            torch.testing.assert_close(p, before[key] * shrink, msg=key)
