"""Weighted kNN classifier on frozen features (InstDisc, Wu et al. 2018, arXiv 1805.01978).

Each test sample's k most cosine-similar training samples vote for their class with weight
exp(s / temperature) (InstDisc §3.4); the class with the largest sum wins. The same function serves
the training monitor, offline evaluation and the raw-pixel baseline (`center=True`).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Bytes of one (chunk, N_train) float32 similarity block: 60k x 10k test rows stay within ~256 MB.
BLOCK_BYTES = 256 * 2**20


def _unit_rows(features: Tensor, mean: Tensor | float) -> Tensor:
    """(N, D) -> float32 rows of norm 1 after subtracting `mean`; never modifies the input."""
    rows = features.detach().float() - mean  # a fresh copy, so it can be scaled in place
    return rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(1e-12))


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    center: bool = False,
) -> Tensor:
    """Class scores (N_test, C) of the weighted vote, each row normalised to sum to 1.

    train_features (N_train, D), train_labels int (N_train,), test_features (N_test, D); computed
    on the device of train_features. `center` subtracts the training mean before the cosine
    (useful for raw pixels, whose shared mean image dominates every similarity). `chunk_size` test
    rows are scored at a time; None picks one so a similarity block stays within BLOCK_BYTES.
    """
    mean = train_features.float().mean(0) if center else 0.0
    train = _unit_rows(train_features, mean)
    test = _unit_rows(test_features.to(train.device), mean)
    labels = train_labels.to(train.device)
    num_classes = num_classes or int(labels.max()) + 1
    k = min(k, len(train))
    chunk_size = chunk_size or max(1, BLOCK_BYTES // (4 * len(train)))
    scores = []
    for start in range(0, len(test), chunk_size):
        similarity = test[start : start + chunk_size] @ train.T  # (chunk, N_train)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (chunk, k)
        # Shifting by the row's best similarity scales the row's weights by one positive factor:
        # the vote is unchanged and exp cannot overflow at small temperatures.
        weights = ((top_similarity - top_similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(len(weights), num_classes, device=train.device)
        votes.scatter_add_(1, labels[top_index], weights)  # sum of weights per class
        scores.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(scores)


def accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in % of class scores (N, C); top-5 is top-min(5, C)."""
    best = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (N, 5), best class first
    hits = best == labels.to(best.device)[:, None]
    top1, top5 = hits[:, 0].float().mean().item(), hits.any(1).float().mean().item()
    return {"top1": 100.0 * top1, "top5": 100.0 * top5}


def knn(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    center: bool = False,
) -> dict[str, float]:
    """Weighted kNN accuracy {"top1", "top5"} in % of test_features (N_test, D), via knn_predict."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
        center=center,
    )
    return accuracy(scores, test_labels)
