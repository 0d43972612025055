"""Distillation (SimCLR v2 eq. 3): the loss, a frozen teacher in eval mode, a run from a teacher
run that needs no labels and stays loadable without its teacher."""

import shutil

import pytest
import torch
from torch import nn

import selfsup
from selfsup.config import resolve
from selfsup.methods.distill import Distill
from selfsup.methods.simclr import SimCLR
from selfsup.methods.supervised import Supervised
from selfsup.step import Views


class Tiny(nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).relu().mean(dim=(2, 3))


def _teacher():
    torch.manual_seed(1)
    return Supervised(Tiny(), num_classes=4)


def test_distillation_loss_is_the_cross_entropy_of_tempered_teacher_and_student(progress):
    torch.manual_seed(0)
    method = Distill(Tiny(), teacher=_teacher(), temperature=2.0).train()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = method(Views([x]), progress)
    with torch.no_grad():
        teacher = method.teacher.head(method.teacher.backbone(x))  # eval mode: running stats
        student = method.head(method.backbone(x))
    p_t = torch.exp(teacher / 2) / torch.exp(teacher / 2).sum(1, keepdim=True)
    log_p_s = student / 2 - torch.log(torch.exp(student / 2).sum(1, keepdim=True))
    torch.testing.assert_close(out["loss"].detach(), -(p_t * log_p_s).sum(1).mean())


def test_teacher_stays_frozen_in_eval_mode_and_gets_no_gradient(progress):
    method = Distill(Tiny(), teacher=_teacher()).train()
    assert not method.teacher.training and method.backbone.training
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    out = method(Views([torch.randn(6, 1, 8, 8)]), progress)
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    after = method.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics too
    assert method.num_classes == 4


def test_a_teacher_must_be_a_classifier():
    with pytest.raises(ValueError, match="train.teacher must be a run of a classifier"):
        Distill(Tiny(), teacher=SimCLR(Tiny(), hidden=8, dim=4))


def test_a_distilled_run_learns_its_teacher_without_labels_and_needs_no_teacher_run(tiny_config):
    tiny_config["method"] = {"name": "supervised"}
    tiny_config["views"] = {"name": "crop_flip", "size": 16, "scale": [0.5, 1.0]}
    tiny_config["train"].update(epochs=2, knn_every=0, name="teacher")
    teacher = selfsup.train(resolve(tiny_config))
    tiny_config["method"] = {"name": "distill"}
    tiny_config["train"].update(name="student", teacher=str(teacher.path), epochs=3, max_steps=20)
    student = selfsup.train(resolve(tiny_config))
    agreement = [r["teacher_agreement"] for r in student.metrics if "teacher_agreement" in r]
    assert agreement[-1] > agreement[0] + 20  # the student comes to agree with its teacher
    assert (student.path / "teacher" / "config.yaml").is_file()
    shutil.rmtree(teacher.path)
    resumed = selfsup.train(resume=student.path, overrides=["train.max_steps=null"])
    assert resumed.checkpoint()["step"] == 30
    assert selfsup.evaluate(resumed, ["knn"])["knn_top1"] > 30  # chance: 10 %
