"""Linear probe: multinomial logistic regression on frozen, pre-computed features.

The probe is convex, so it is solved to its optimum with full-batch L-BFGS (strong-Wolfe line
search) from zero weights, as scikit-learn's LogisticRegression does, instead of tuning an SGD
schedule: the score then measures the features, not the optimiser. An L2 penalty on the weights
(not the bias) is the only regulariser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.eval.knn import accuracy


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
    weight_decay: float = 1e-3,
    batch_size: int | None = None,
    seed: int = 0,
    standardize: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Top-1/top-5 test accuracy in % of a logistic regression trained on (N_train, D) features.

    Minimises mean cross-entropy + weight_decay / 2 * ||W||^2 over a single nn.Linear(D, C).

    Args:
        epochs: L-BFGS iterations; each costs about one pass over the training features.
        lr: L-BFGS step scale (1.0 lets the line search pick the step).
        batch_size: rows per forward/backward chunk when the (N, C) logits would not fit at once;
            the gradient is the full-batch one either way. None: all rows together.
        seed: accepted so every protocol takes one; the solve from zero weights uses no
            randomness, so equal inputs always give equal results.
        device: where to train; None keeps the features' device.
    """
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
        return accuracy(classifier(x_test), y_test)
