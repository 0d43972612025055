"""Supervised training through the same loop: the cross-entropy baseline from scratch, and
fine-tuning a pre-trained run's encoder with a new linear head (whole, or frozen up to a stage).

Fine-tuning is how SimCLR (§B.5) and its successors measure label efficiency: the encoder of a
self-supervised run (train.init) gets a fresh linear classifier and both train on the labels
(all of them, or a class-balanced fraction: train.label_fraction, selfsup/data/subsets.py).
SimCLR v2 (§2) fine-tunes from the projector's first layer instead: method.from_projector=1.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.heads import mlp_blocks
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
    """Fine-tuning: a pre-trained run's encoder (train.init) + a new linear head, on labels.

    from_projector = k > 0 keeps the first k hidden blocks (Linear + norm + activation) of the
    pre-trained projector on top of the encoder: the classifier is f(x) = W σ(W_mlp h) for k = 1,
    SimCLR v2's "fine-tuning from the 1st layer of the projection head" (Chen et al. 2020b,
    arXiv 2006.10029, §2; with the 3-layer head: +14 % relative top-1 on 1 % of ImageNet's labels).
    Those blocks then belong to the run's encoder: evaluation and `embed` see σ(W_mlp h).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        pretrained: Method,
        num_classes: int,
        freeze_to: str | None = None,  # e.g. layer2: that stage and all before it stay fixed
        from_projector: int = 0,  # 0: from the encoder output h; k: after k projector blocks
        label_smoothing: float = 0.0,
    ) -> None:
        del backbone  # the recipe's backbone section only says what the pre-trained run used
        encoder = pretrained.encoder
        frozen = freeze_up_to(encoder, freeze_to) if freeze_to else []
        if from_projector:
            encoder = ProjectedEncoder(encoder, projector_blocks(pretrained, from_projector))
        super().__init__(encoder, num_classes=num_classes, label_smoothing=label_smoothing)
        self.frozen = frozen

    def train(self, mode: bool = True) -> FineTune:
        super().train(mode)
        for module in self.frozen:  # frozen stages keep their BN statistics too
            module.eval()
        return self


class ProjectedEncoder(nn.Module):
    """An encoder followed by the first blocks of its projector: x -> σ(W_mlp h), (N, hidden)."""

    def __init__(self, encoder: nn.Module, projector: nn.Sequential) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.num_features = [m for m in projector if isinstance(m, nn.Linear)][-1].out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.encoder(x))


def projector_blocks(pretrained: Method, count: int) -> nn.Sequential:
    """The first `count` hidden blocks of `pretrained.projector` (each Linear [+ norm] +
    activation, as `heads.mlp` builds them), sharing its modules and weights."""
    if count < 0:
        raise ValueError(f"method.from_projector must be >= 0, got {count}")
    name, projector = type(pretrained).__name__, getattr(pretrained, "projector", None)
    if not isinstance(projector, nn.Module):
        raise ValueError(
            f"method.from_projector={count} keeps layers of the pre-trained projector, and the "
            f"pre-trained method ({name}) has none; use method.from_projector=0"
        )
    hidden = mlp_blocks(projector)[:-1]
    if count > len(hidden):
        raise ValueError(
            f"method.from_projector={count}, and the pre-trained projector of {name} has "
            f"{len(hidden)} hidden layer(s) (Linear + norm + activation); valid: 0 to {len(hidden)}"
        )
    return nn.Sequential(*[module for block in hidden[:count] for module in block])


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
