"""Linear probe: multinomial logistic regression on frozen, pre-computed features.

The probe is convex, so it is solved to its optimum with full-batch L-BFGS (strong-Wolfe line
search) from zero weights, as scikit-learn's LogisticRegression does, instead of tuning an SGD
schedule: the score then measures the features, not the optimiser. An L2 penalty on the weights
(not the bias) is the only regulariser; its strength is chosen per feature set on a held-out part
of the training split (`select_weight_decay`), as the linear transfer evaluations of SimCLR and
its successors choose theirs on validation data, because the best value differs between feature
sets: on Fashion-MNIST raw pixels (784-d) want 1e-3 and 128-d learned features 1e-5 or less, and
any one fixed value favours one of them (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.probes.knn import accuracy


def standardize_features(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Scale both (N, D) sets with the training mean/std; constant features keep scale 1."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # as scikit-learn's StandardScaler
    return (train - mean) / std, (test - mean) / std


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float | Sequence[float] = 1e-3,
    val_fraction: float = 0.1,
    batch_size: int | None = None,
    seed: int = 0,
    standardize: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Top-1/top-5 test accuracy in % of a logistic regression trained on (N_train, D) features.

    Minimises mean cross-entropy + weight_decay / 2 * ||W||^2 over a single nn.Linear(D, C).
    With several `weight_decay` candidates, the one with the best accuracy on a held-out
    `val_fraction` of the training rows is chosen (`select_weight_decay`), then the probe is
    trained on all training rows with it; the result then also holds "weight_decay".

    Args:
        epochs: L-BFGS iterations; each costs about one pass over the training features.
        lr: L-BFGS step scale (1.0 lets the line search pick the step).
        batch_size: rows per forward/backward chunk when the (N, C) logits would not fit at once;
            the gradient is the full-batch one either way. None: all rows together.
        val_fraction: share of the training rows held out to choose the weight decay.
        seed: the held-out rows' permutation; the solve itself starts from zero weights and uses
            no randomness, so equal inputs always give equal results.
        device: where to train; None keeps the features' device.
    """
    extra: dict[str, float] = {}
    if not isinstance(weight_decay, (int, float)):
        weight_decay = select_weight_decay(
            train_features,
            train_labels,
            weight_decay,
            val_fraction=val_fraction,
            seed=seed,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            standardize=standardize,
            device=device,
        )
        extra["weight_decay"] = weight_decay
    device = torch.device(device) if device is not None else train_features.device
    x_train = train_features.detach().to(device, torch.float32)
    x_test = test_features.detach().to(device, torch.float32)
    y_train, y_test = train_labels.to(device), test_labels.to(device)
    if standardize:
        x_train, x_test = standardize_features(x_train, x_test)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    # skip_init: zero weights without drawing from (and shifting) the caller's global RNG
    classifier = nn.utils.skip_init(nn.Linear, x_train.shape[1], num_classes, device=device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(), lr=lr, max_iter=epochs, line_search_fn="strong_wolfe"
    )
    n, chunk = len(x_train), batch_size or len(x_train)

    def objective() -> Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), device=device)
        for start in range(0, n, chunk):
            logits = classifier(x_train[start : start + chunk])
            loss = F.cross_entropy(logits, y_train[start : start + chunk], reduction="sum") / n
            loss.backward()  # accumulates the full-batch gradient chunk by chunk
            total += loss.detach()
        penalty = 0.5 * weight_decay * classifier.weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    optimizer.step(objective)
    with torch.no_grad():
        return {**accuracy(classifier(x_test), y_test), **extra}


def validation_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit rows, held-out rows) of n rows: a seeded permutation, its first part held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held_out = max(1, round(n * fraction))
    return order[held_out:], order[:held_out]


def select_weight_decay(
    features: Tensor,
    labels: Tensor,
    candidates: Sequence[float],
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    **probe: object,
) -> float:
    """The candidate with the best top-1 on a held-out part of the training rows.

    Each candidate's probe is fitted on the other rows (`validation_split`); ties go to the
    stronger penalty. `probe` holds linear_probe's other keyword arguments.
    """
    candidates = [float(c) for c in candidates]
    if not candidates:
        raise ValueError("select_weight_decay needs at least one candidate")
    if len(candidates) == 1:
        return candidates[0]
    fit, held_out = validation_split(len(features), val_fraction, seed)
    labels = labels.to(features.device)
    fit, held_out = fit.to(features.device), held_out.to(features.device)
    scores = {
        wd: linear_probe(
            features[fit],
            labels[fit],
            features[held_out],
            labels[held_out],
            weight_decay=wd,
            seed=seed,
            **probe,
        )["top1"]
        for wd in candidates
    }
    return max(candidates, key=lambda wd: (scores[wd], wd))
