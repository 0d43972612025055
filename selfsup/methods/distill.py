"""Distillation (SimCLR v2, Chen et al. 2020b, arXiv 2006.10029 §2, eq. 3): a student learns a
fine-tuned teacher's class probabilities on unlabelled images, without labels.

    L = −Σ_x Σ_y P_T(y | x; τ) log P_S(y | x; τ),   P(y | x; τ) = softmax(f(x) / τ)_y

The teacher is a finished classifier run (supervised, finetune or distill: train.teacher), frozen
and in eval mode; it sees the same augmented view as the student. With the student's encoder the
size of the teacher's this is self-distillation, which SimCLR v2 finds still improves it (§4.4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.methods.base import Method
from selfsup.methods.supervised import Supervised
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views


@METHODS.register("distill")
class Distill(Supervised):
    """Distillation: a student classifier learns a teacher run's soft labels, no labels used."""

    uses_labels = False

    def __init__(self, backbone: nn.Module, *, teacher: Method, temperature: float = 1.0) -> None:
        check_method(temperature=temperature)
        if not isinstance(teacher, Supervised):
            raise ValueError(
                f"train.teacher must be a run of a classifier (supervised, finetune or distill), "
                f"not of {type(teacher).__name__}; fine-tune it first (`selfsup finetune RUN`)"
            )
        super().__init__(backbone, num_classes=teacher.num_classes)
        self.teacher = teacher.requires_grad_(False)  # its weights travel in our checkpoints
        self.temperature = temperature

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.teacher.eval()  # BN with its running statistics, no dropout: a fixed target
        return self

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x = views.large[0]
        with torch.no_grad():
            target = (self.teacher.classify(x) / self.temperature).softmax(dim=1)  # P_T
        log_student = (self.classify(x) / self.temperature).log_softmax(dim=1)  # log P_S
        loss = -(target * log_student).sum(dim=1).mean()
        agreement = (log_student.detach().argmax(1) == target.argmax(1)).float().mean() * 100
        return {"loss": loss, "teacher_agreement": agreement}
