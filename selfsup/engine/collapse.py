"""The collapse guard: every method's run watches its representation for collapse.

A collapsed encoder maps every image to (nearly) the same vector: the loss may still look sane
(SimSiam without its stop-gradient reaches the minimum −1, §4.1), but the features are worthless
and training on is wasted time. At every metrics line the guard embeds a fixed set of training
images (evaluation transform, eval mode, no gradient) with the method's encoder and logs two
statistics of the L2-normalised embeddings (probes/statistics.py): their spread `embed_std`
(std over samples × sqrt(D): ~1 spread, 0 collapsed) and their effective rank `embed_rank`. When
both are below their floors for `PATIENCE` lines in a row, training stops with `CollapseError`
naming the step, the values and what to try. `train.collapse_guard: false` turns it off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from selfsup.config import Config
from selfsup.data.datasets import ImageData
from selfsup.data.subsets import seeded_subset
from selfsup.probes.features import extract
from selfsup.probes.statistics import effective_rank, normalized_std

PROBE_SIZE = 256  # training images embedded at each check (~1 % of a CPU recipe's step time)
# Floors, both crossed = collapsed: a collapsed run sits at std ~0 and rank ~1. Measured on 256
# Fashion-MNIST images (docs/methods.md, "Collapse guard"): healthy runs 0.34-0.56 and rank 21-56;
# untrained encoders: ResNet-18 (width 1/4) 0.11 / 16, ViT-tiny 0.50 / 18, and ResNet-50 (width
# 1/4) 0.039 / 7.1, below the std floor alone, which is why the guard needs both.
MIN_STD = 0.02
MIN_RANK = 1.5
PATIENCE = 3  # consecutive collapsed checks before stopping: one odd batch is not a collapse


class CollapseError(RuntimeError):
    """Training stopped because the representation collapsed; `stats` holds the last check's."""

    def __init__(self, message: str, stats: dict[str, float]) -> None:
        super().__init__(message)
        self.stats = stats


class CollapseGuard:
    def __init__(self, images: torch.Tensor, transform: Any, device: Any) -> None:
        self.images, self.transform, self.device = images, transform, device
        self.collapsed_checks = 0

    @classmethod
    def create(
        cls, config: Config, data: ImageData, views: Any, device: Any
    ) -> CollapseGuard | None:
        """A guard on a fixed, seeded subset of the training images; None when switched off."""
        if not config.train.collapse_guard:
            return None
        index = seeded_subset(len(data), PROBE_SIZE, config.train.seed)
        return cls(data.images[index], views.eval_transform, device)

    def __call__(self, encoder: nn.Module, step: int) -> dict[str, float]:
        """The statistics of this check; raises CollapseError after PATIENCE collapsed checks."""
        features = extract(encoder, self.images, self.transform, PROBE_SIZE, self.device)
        stats = {
            "embed_std": round(normalized_std(features), 4),
            "embed_rank": round(effective_rank(features), 2),
        }
        collapsed = stats["embed_std"] < MIN_STD and stats["embed_rank"] < MIN_RANK
        self.collapsed_checks = self.collapsed_checks + 1 if collapsed else 0
        if self.collapsed_checks >= PATIENCE:
            raise CollapseError(message(step, stats, features.shape[1]), stats)
        return stats


def message(step: int, stats: dict[str, float], dim: int) -> str:
    return (
        f"the representation collapsed at step {step}: {PROBE_SIZE} training images map to "
        f"nearly one vector (embed_std {stats['embed_std']} < {MIN_STD}, embed_rank "
        f"{stats['embed_rank']} of at most {min(PROBE_SIZE, dim)}, < {MIN_RANK}, for "
        f"{PATIENCE} checks in a row). Try a lower optim.lr or a longer optim.warmup_epochs; "
        f"for methods without negatives, keep the method's predictor, stop-gradient or "
        f"momentum target as its paper has them; for contrastive ones a lower temperature or a "
        f"larger batch. To train on regardless: --set train.collapse_guard=false"
    )
