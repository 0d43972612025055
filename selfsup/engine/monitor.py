"""Online kNN monitor: a fixed labelled subset of train as the bank, part of test as queries."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from selfsup.build import load_data
from selfsup.config import Config
from selfsup.data.datasets import ImageData
from selfsup.eval.features import extract
from selfsup.eval.knn import knn


class KnnMonitor:
    def __init__(
        self, bank: ImageData, queries: ImageData, transform: Any, config: Config, device: Any
    ) -> None:
        self.bank, self.queries, self.transform = bank, queries, transform
        self.k, self.temperature = config.eval.knn_k, config.eval.knn_temperature
        self.batch_size, self.device = config.eval.batch_size, device

    @classmethod
    def create(cls, config: Config, train: ImageData, views: Any, device: Any) -> KnnMonitor | None:
        """None when the data has no labels or no test split, or the monitor is switched off."""
        if config.train.knn_every <= 0 or train.labels is None:
            return None
        try:
            test = load_data(config, config.eval.test_split)
        except (FileNotFoundError, ValueError):
            return None
        if test.labels is None:
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
        )
        return {"knn_top1": result["top1"], "knn_top5": result["top5"]}


def _subset(data: ImageData, size: int, seed: int) -> ImageData:
    if size >= len(data):
        return data
    index: Tensor = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size]
    return ImageData(data.images[index], data.labels[index], data.classes)
