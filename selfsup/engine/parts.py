"""Everything one training step needs, built from a config: the method and its DDP wrapper, the
optimizer and its schedule, the batches and views, the precision and the micro-batches."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import selfsup.dist as dist
from selfsup.build import build_method, build_views, data_info, pick_device
from selfsup.config import Config
from selfsup.data.datasets import ImageData
from selfsup.data.loader import Batches
from selfsup.engine.accumulate import Accumulation
from selfsup.engine.optim import Schedule, build_optimizer
from selfsup.engine.step import Precision, training_step
from selfsup.files import CheckpointError, one_line, rng_state, set_rng_state
from selfsup.methods.base import Method
from selfsup.step import Progress, Views


@dataclass
class Parts:
    """Everything one training step needs, built from a config: the same for training, the
    budget calibration and benchmarks/throughput.py."""

    config: Config
    device: torch.device
    info: dict[str, Any]
    views: Any
    method: Method
    model: torch.nn.Module  # what runs forward: the method, or its DDP wrapper (dist.data_parallel)
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    batches: Batches
    labels: Tensor | None  # on the device; only for a method that uses labels
    generator: torch.Generator
    precision: Precision
    memory_format: torch.memory_format
    accumulation: Accumulation  # train.accumulate micro-batches per step

    @classmethod
    def build(
        cls,
        config: Config,
        data: ImageData,
        run_dir: Path | None = None,
        init_weights: bool = True,
    ) -> Parts:
        """Seeded parts of a new run, or of the run in `run_dir`; `init_weights`: load the
        weights of the runs it starts from (build_method)."""
        settings = config.train
        device = dist.local_device(pick_device(settings.device))
        # the same weights, memory banks and queues on every process; the steps then draw from
        # a stream per process (own_random_stream)
        torch.manual_seed(settings.seed)
        views = build_views(config)
        info = data_info(data, views)
        views.set_stats(info["mean"], info["std"])
        method = build_method(config, info, run_dir, init_weights).to(device)
        if settings.sync_bn:
            method = dist.sync_batch_norm(method, device)
        memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        method = method.to(memory_format=memory_format)
        if settings.compile:
            method.backbone.forward = torch.compile(method.backbone.forward)
        batches = Batches(
            data.images if data.mapped else data.images.to(device),  # mapped: read per batch
            config.optim.batch_size,
            seed=settings.seed,
            rank=dist.process_rank(),
            world=dist.processes(),
            device=device,
        )
        if batches.local_batch_size % settings.accumulate:
            raise ValueError(
                f"train.accumulate={settings.accumulate} does not divide the batch of each of "
                f"{dist.processes()} process(es) ({batches.local_batch_size} images); choose "
                f"optim.batch_size as a multiple of {dist.processes() * settings.accumulate}"
            )
        total_steps = max(round(settings.epochs * batches.steps_per_epoch), 1)
        optimizer = build_optimizer(method, config.optim)
        if method.uses_labels and data.labels is None:
            raise ValueError(
                f"method '{config.method['name']}' trains on labels and dataset "
                f"'{config.data['name']}' has none; choose a labelled dataset"
            )
        labels = data.labels.to(device) if method.uses_labels else None
        return cls(
            config,
            device,
            info,
            views,
            method,
            dist.data_parallel(method, device),
            optimizer,
            Schedule(
                optimizer, config.optim, batches.steps_per_epoch, total_steps, settings.replan
            ),
            batches,
            labels,
            torch.Generator(device).manual_seed(settings.seed),
            Precision(settings.precision, device),
            memory_format,
            Accumulation(settings.accumulate),
        )

    def step(self, step: int) -> dict[str, Tensor]:
        """Optimisation step number `step` (0-based) on the next batch; returns its outputs."""
        spe = self.batches.steps_per_epoch
        # the schedules' position: the step itself, unless a budget re-planned the run's rest
        at = self.schedule.position(step)
        progress = Progress(step, at / spe, at / self.schedule.total_steps)
        self.schedule.apply(step)
        own_random_stream(self.config.train.seed, step)
        images, index = self.batches.next()
        # every process draws the augmentations of the whole global batch and keeps its rows:
        # the same views as on one process, whatever the number of processes
        share = (self.batches.rank, self.batches.world)
        large, small = self.views(images, self.generator, share)
        labels = self.labels[index] if self.labels is not None else None
        return training_step(
            self.method,
            self.optimizer,
            Views(self._layout(large), self._layout(small), index, labels),
            progress,
            self.precision,
            self.config.optim.clip,
            self.schedule,
            model=self.model,
            accumulation=self.accumulation,
        )

    def _layout(self, crops: list[Tensor]) -> list[Tensor]:
        return [crop.contiguous(memory_format=self.memory_format) for crop in crops]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: on several processes rank 0's, whose global RNG state is
        the stream of a one-process run (`own_random_stream`)."""
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": rng_state(self.generator),
            "scaler": self.precision.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> int:
        """Restore the checkpoint read from `path`; returns its step."""
        try:
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.batches.load_state_dict(state["batches"])
            set_rng_state(state["rng"], self.generator)
        except (RuntimeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint {path} does not fit this run ({one_line(error)}); was "
                f"checkpoints/ copied from another run?"
            ) from error
        if state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        return state["step"]


def own_random_stream(seed: int, step: int) -> None:
    """Torch's global RNG for this process's draws in step `step` (dropout, stochastic depth,
    sampled negatives): each process its own, so that the processes' draws are independent.

    Rank 0 goes on with the stream that `Parts.build` seeded, which is a one-process run's and
    what a checkpoint keeps; rank r > 0 draws step `step` from a stream seeded by (seed, r, step),
    the same after a resume. Everything the processes must draw alike comes from elsewhere: the
    weights (built before any step, from train.seed), the views (`Parts.generator`, the same on
    every process) and MoCo's shuffle (rank 0's draw, sent to all by `GlobalBatch.shared`).
    """
    rank = dist.process_rank()
    if rank > 0:
        key = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
        torch.manual_seed(int.from_bytes(key, "little"))  # CUDA's generators too
