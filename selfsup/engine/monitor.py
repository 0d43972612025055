"""Monitors during training: the online kNN (a fixed labelled subset of train as the bank, part
of test as queries) and the gradient decomposition (decomposition.py) on a fixed batch."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.build import load_data
from selfsup.config import Config
from selfsup.data.datasets import ImageData
from selfsup.data.subsets import seeded_subset
from selfsup.decomposition import decompose, with_balance
from selfsup.engine.accumulate import batch_norm_state, restore_state
from selfsup.methods import with_gradient_terms
from selfsup.probes.features import extract
from selfsup.probes.knn import knn
from selfsup.step import Views

logger = logging.getLogger(__name__)


class KnnMonitor:
    def __init__(
        self, bank: ImageData, queries: ImageData, transform: Any, config: Config, device: Any
    ) -> None:
        self.bank, self.queries, self.transform = bank, queries, transform
        self.k, self.temperature = config.eval.knn_k, config.eval.knn_temperature
        self.center = config.eval.knn_center
        self.batch_size, self.device = config.eval.batch_size, device

    @classmethod
    def create(
        cls, config: Config, train: ImageData, views: Any, device: Any, explain: bool = False
    ) -> KnnMonitor | None:
        """None when the data has no labels or no test split, or the monitor is switched off;
        with `explain`, why is logged in one line (an unlabelled folder of your own images)."""
        if config.train.knn_every <= 0:
            return None
        why = None
        if train.labels is None:
            why = "the training images have no labels"
        else:
            try:
                test = load_data(config, config.eval.test_split)
            except (FileNotFoundError, ValueError) as error:
                why = f"no labelled {config.eval.test_split} split ({error})"
            else:
                if test.labels is None:
                    why = f"the {config.eval.test_split} split has no labels"
        if why is not None:
            if explain:
                logger.info(f"selfsup: kNN monitor off: {why}")
            return None
        return cls(
            _subset(train, config.eval.monitor_train, config.train.seed),
            _subset(test, config.eval.monitor_test, config.train.seed),
            views.eval_transform,
            config,
            device,
        )

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        bank = extract(encoder, self.bank.images, self.transform, self.batch_size, self.device)
        queries = extract(
            encoder, self.queries.images, self.transform, self.batch_size, self.device
        )
        result = knn(
            bank,
            self.bank.labels,
            queries,
            self.queries.labels,
            k=self.k,
            temperature=self.temperature,
            num_classes=self.bank.num_classes,
            center=self.center,
        )
        return {"knn_top1": result["top1"], "knn_top5": result["top5"]}


def _subset(data: ImageData, size: int, seed: int) -> ImageData:
    if size >= len(data):
        return data
    index = seeded_subset(len(data), size, seed)
    return ImageData(data.images[index], data.labels[index], data.classes)


class GradientMonitor:
    """train.gradients_every: the gradient decomposition of the method's loss (Tao et al. 2022,
    arXiv 2112.05141: the positive and negative gradient, their balance and angles) on one fixed
    batch of training images, its views drawn anew each time from a generator seeded by
    (train.seed, step).

    It leaves training exactly as it would be without it: torch's global RNG is restored after
    it, and so are batch norm's running statistics (its forward runs in training mode, as a
    step's). Under torchrun every process computes it (MoCo's shuffled BN and synchronised BN
    exchange tensors), rank 0 logs it."""

    BATCH = 256  # images of the probe batch, at most optim.batch_size

    def __init__(self, images: Tensor, views: Any, seed: int, device: Any) -> None:
        self.images, self.views = images, views
        self.seed, self.device = seed, device

    @classmethod
    def create(
        cls, config: Config, train: ImageData, views: Any, device: Any
    ) -> GradientMonitor | None:
        if config.train.gradients_every == 0:
            return None
        name = config.method["name"]
        if name not in with_gradient_terms():
            raise ValueError(
                f"train.gradients_every: the gradient decomposition of method '{name}' is not "
                f"supported (supported: {', '.join(with_gradient_terms())}); set "
                f"train.gradients_every=0"
            )
        size = min(cls.BATCH, config.optim.batch_size, len(train))
        index = seeded_subset(len(train), size, config.train.seed)
        return cls(train.images[index], views, config.train.seed, device)

    def __call__(self, method: nn.Module, step: int) -> dict[str, float]:
        saved = batch_norm_state(method)
        with torch.random.fork_rng(devices=[]):  # MoCo's shuffle draws from the global RNG
            torch.manual_seed(self.seed * 1_000_003 + step)
            generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + step)
            large, small = self.views(self.images.to(self.device), generator)
            scalars = decompose(method, Views(large, small))
        restore_state(saved)
        return with_balance(scalars)
