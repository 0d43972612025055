"""The method contract: what every method (self-supervised or supervised) is to the engine.

A method is a backbone plus what its paper adds (heads, a target branch, negatives, a loss). It
sees augmented views and training progress; never devices, optimizers, files or logs, and labels
only when it says it trains on them (`uses_labels`). What it needs from the engine it names as a
constructor parameter (`SUPPLIED`), and the engine passes it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from selfsup.decomposition import Term
from selfsup.params import Group
from selfsup.step import Progress, Views

__all__ = ["SUPPLIED", "Method", "Progress", "Views"]

# Constructor parameters the engine fills in for a method that names them; a recipe cannot set
# them. Values: what the engine passes.
SUPPLIED = {
    "backbone": "the backbone of the recipe's backbone section",
    "make_backbone": "a factory: make_backbone(in_channels=C) builds another backbone like it",
    "num_samples": "the number of training images (one memory-bank slot each)",
    "num_classes": "the number of classes of the labelled training data",
    "pretrained": "the method of the run named by train.init, with its weights (fine-tuning)",
    "teacher": "the method of the run named by train.teacher, with its weights (distillation)",
}


class Method(nn.Module):
    """Backbone plus what a paper adds. Subclasses build their parts and define `forward`."""

    uses_labels: ClassVar[bool] = False  # True: the engine fills views.labels
    # True: forward trains on views.small (multi-crop); a view set with small views is refused
    # for the others (config.py), which would compute them for nothing
    uses_small_views: ClassVar[bool] = False
    # the train.target settings it has (selfsup/target.py); "method" only: no target branch
    target_settings: ClassVar[tuple[str, ...]] = ("method",)

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def encoder(self) -> nn.Module:
        """The module whose output is the representation: the kNN monitor, evaluation, `embed`
        and `export` use it. The backbone, unless the method says otherwise (CPC's pooled patch
        grid, CMC's encoders side by side). It has `num_features`, its output's width."""
        return self.backbone

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        """{"loss": scalar, **scalars to log, **tensors that after_step needs}.

        Changes no state of the method's own: running it twice equals running it once (the
        gradient analysis, loss inspection and train.accumulate's recording pass run it freely).
        Scalars (0-d tensors) are logged; other entries, such as MoCo's keys, only reach
        `after_step`, and have one leading row per sample or per process: the outputs of
        micro-batches (train.accumulate) are concatenated along dim 0, as a gather of several
        processes' outputs is.
        """
        raise NotImplementedError

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        """State updates after the optimizer step, from what forward returned: EMA, queue push,
        memory-bank write, centre. Runs under no_grad."""

    def gradient_terms(self, views: Views) -> list[Term]:
        """The loss's gradient with respect to the online embeddings u, split into a positive part
        (toward the target v⁺) and negative parts (Tao et al. 2022, "Exploring the Equivalence of
        Siamese Self-Supervised Learning via A Unified Gradient Framework", arXiv 2112.05141).

        One (prefix of the scalars' names, parts, targets v⁺) per loss term, both of a symmetrised
        loss; u and v⁺ computed as `forward` computes them, v⁺ held constant; the parts of a term
        sum to ∂L/∂u (the pure part functions of selfsup/decomposition.py). Runs under no_grad and,
        as `forward`, changes no state of the method's own. Optional: a method without it has no
        gradient decomposition (`has_gradient_terms`).
        """
        raise NotImplementedError(f"{type(self).__name__} has no gradient decomposition")

    @classmethod
    def has_gradient_terms(cls) -> bool:
        """Whether the method defines `gradient_terms`; asked of the class, before building it."""
        return cls.gradient_terms is not Method.gradient_terms

    def parameter_groups(self) -> dict[str, Group]:
        """Parameter-name prefix -> how that group is optimised (SimSiam's predictor: fixed lr).

        A recipe's `optim.groups` entry for the same prefix replaces the method's.
        """
        return {}

    def encode(self, crops: list[Tensor]) -> list[Tensor]:
        """Backbone features of each crop; crops of equal size go through in one batch."""
        out: list[Tensor | None] = [None] * len(crops)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, crop in enumerate(crops):
            by_shape.setdefault(tuple(crop.shape[1:]), []).append(i)
        for indices in by_shape.values():
            features = self.backbone(torch.cat([crops[i] for i in indices]))
            for i, chunk in zip(indices, features.chunk(len(indices)), strict=True):
                out[i] = chunk
        return out  # type: ignore[return-value]
