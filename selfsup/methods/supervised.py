"""Supervised training through the same loop: the cross-entropy baseline from scratch, and
fine-tuning a pre-trained run's encoder with a new linear head (whole, or frozen up to a stage).

Fine-tuning is how SimCLR (§B.5) and its successors measure label efficiency: the encoder of a
self-supervised run (train.init) gets a fresh linear classifier and both train on the labels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.base import Method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views


@METHODS.register("supervised")
class Supervised(Method):
    """Supervised baseline: encoder + linear classifier trained with cross-entropy on labels."""

    uses_labels = True

    def __init__(
        self, backbone: nn.Module, *, num_classes: int, label_smoothing: float = 0.0
    ) -> None:
        super().__init__(backbone)
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def classify(self, x: Tensor) -> Tensor:
        """Class logits (N, num_classes) of images x."""
        return self.head(self.encoder(x))

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        logits = self.classify(views.large[0])
        loss = F.cross_entropy(logits, views.labels, label_smoothing=self.label_smoothing)
        top1 = (logits.detach().argmax(dim=1) == views.labels).float().mean() * 100
        return {"loss": loss, "train_top1": top1}


@METHODS.register("finetune")
class FineTune(Supervised):
    """Fine-tuning: a pre-trained run's encoder (train.init) + a new linear head, on labels."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        pretrained: nn.Module,
        num_classes: int,
        freeze_to: str | None = None,  # e.g. layer2: that stage and all before it stay fixed
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(pretrained, num_classes=num_classes, label_smoothing=label_smoothing)
        del backbone  # the recipe's backbone section only says what the pre-trained run used
        self.frozen = freeze_up_to(pretrained, freeze_to) if freeze_to else []

    def train(self, mode: bool = True) -> FineTune:
        super().train(mode)
        for module in self.frozen:  # frozen stages keep their BN statistics too
            module.eval()
        return self


def freeze_up_to(encoder: nn.Module, stage: str) -> list[nn.Module]:
    """Stop gradients to every parameter registered up to the last one of `stage` (a module
    name such as layer2 or blocks.5); returns the modules now wholly frozen."""
    names = [name for name, _ in encoder.named_parameters()]
    inside = [i for i, name in enumerate(names) if name.startswith(f"{stage}.")]
    if not inside:
        stages = getattr(encoder, "stage_names", [n for n, _ in encoder.named_children()])
        raise ValueError(
            f"method.freeze_to='{stage}' names no part of the encoder; valid: {', '.join(stages)}"
        )
    frozen_names = set(names[: inside[-1] + 1])
    for name, parameter in encoder.named_parameters():
        if name in frozen_names:
            parameter.requires_grad_(False)
    return _wholly_frozen(encoder)


def _wholly_frozen(module: nn.Module) -> list[nn.Module]:
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    return [m for child in module.children() for m in _wholly_frozen(child)]
