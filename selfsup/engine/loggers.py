"""Where the lines of metrics.jsonl also go (train.loggers): TensorBoard event files and MLflow
runs, beside metrics.jsonl itself, which is always written and stays the run folder's record.

Every number of a line goes to each logger at the line's step, named by its key (`loss`, `lr`,
`knn_top1`, ...), or `<event>/<key>` for an event's line (`start/parameters`,
`gradients/<key>`, `collapse/embed_std`). Only rank 0 writes (engine/train.py opens a RunLog
there and an empty one on the other processes). Each library is imported only when its logger
is named, and checked for when a run starts (`check_installed`), before anything is trained.

A resumed run (RunLog.truncate_after: the steps after its checkpoint are redone) appends to the
same logs: metrics.jsonl drops those steps' lines; TensorBoard hides their events (purge_step);
MLflow cannot delete logged points, so it skips re-logging a key at a step it already has (the
redone steps give the same losses: the resume is exact). A logger named only on resume first
receives the lines already in metrics.jsonl.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from selfsup.config import LOGGERS, Config
from selfsup.extras import missing, require
from selfsup.files import MetricsLog, read_metrics
from selfsup.run import Run

log = logging.getLogger(__name__)

# the module each logger imports and the pip extra that installs it (pyproject.toml)
LIBRARIES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def check_installed(names: tuple[str, ...]) -> None:
    """One line naming the extra to install for the first named logger whose library is missing."""
    for name in names:
        if name in LIBRARIES:
            module, extra = LIBRARIES[name]
            require(
                extra, (module,), f"train.loggers' {name}", f"or drop {name} from train.loggers"
            )


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line under the names the loggers give them."""
    prefix = f"{record['event']}/" if "event" in record else ""
    return {
        f"{prefix}{key}": float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class Logger:
    """The interface: a line to write, a resume after `step`, the end of the run's sitting
    (`status`: finished, failed or killed)."""

    def write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def truncate_after(self, step: int) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        pass


class JsonlLogger(Logger):
    """metrics.jsonl (files.MetricsLog): one JSON object per line."""

    def __init__(self, run: Run, config: Config) -> None:
        self.log = MetricsLog(run.metrics_path)

    def write(self, record: dict[str, Any]) -> None:
        self.log.write(record)

    def truncate_after(self, step: int) -> None:
        self.log.truncate_after(step)


class TensorBoardLogger(Logger):
    """Event files in <run>/tensorboard (`tensorboard --logdir runs/`)."""

    def __init__(self, run: Run, config: Config) -> None:
        self.folder, self.metrics_path = run.path / "tensorboard", run.metrics_path
        self.writer: Any = None
        self.purge_step: int | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of this step and later from the sitting
            # before (those a resumed run redoes)
            self.writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def truncate_after(self, step: int) -> None:
        if any(self.folder.glob("events.out.tfevents.*")):
            self.purge_step = step + 1
        else:  # named on resume: the run so far first
            for record in _kept(self.metrics_path, step):
                self.write(record)

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class MlflowLogger(Logger):
    """An MLflow run in the experiment named after the run folder: the flattened config as
    params, every number as a metric at its step. The store is <run>/mlruns unless
    MLFLOW_TRACKING_URI says otherwise; the run is found again on resume by its `selfsup.run`
    tag (the run folder's absolute path)."""

    def __init__(self, run: Run, config: Config) -> None:
        # no usage data sent anywhere; the local file store is in maintenance in MLflow 3 and
        # refused unless allowed (setdefault: a user's own setting wins)
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.path / "mlruns").resolve().as_uri()
        self.client = MlflowClient(self.uri)
        self.name, self.tag = run.path.name, str(run.path.resolve())
        self.metrics_path, self.config = run.metrics_path, config
        self.run_id: str | None = None
        self.logged: dict[str, int] = {}  # on resume: the last step of each key it has

    def write(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            self.run_id = self._create_run()
        step, now = record["step"], int(time.time() * 1000)
        named = {_metric_name(name): value for name, value in scalars(record).items()}
        metrics = [
            Metric(name, value, now, step)
            for name, value in named.items()
            if step > self.logged.get(name, -1)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def truncate_after(self, step: int) -> None:
        self.run_id = self.find_run()
        if self.run_id is None:  # named on resume: the run so far first
            for record in _kept(self.metrics_path, step):
                self.write(record)
            return
        self.client.update_run(self.run_id, status="RUNNING")
        data = self.client.get_run(self.run_id).data
        for key in data.metrics:
            history = self.client.get_metric_history(self.run_id, key)
            self.logged[key] = max(metric.step for metric in history)
        self._log_params(data.params)

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status.upper())

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.name)
        except MlflowException:  # created meanwhile by another run of the same name
            return self.client.get_experiment_by_name(self.name).experiment_id

    def find_run(self) -> str | None:
        """The id of the MLflow run this run folder trained in (its `selfsup.run` tag), if any."""
        for found in self.client.search_runs([self._experiment_id()]):
            if found.data.tags.get("selfsup.run") == self.tag:
                return found.info.run_id
        return None

    def _create_run(self) -> str:
        tags = {"selfsup.run": self.tag}
        created = self.client.create_run(self._experiment_id(), run_name=self.name, tags=tags)
        self.run_id = created.info.run_id
        self._log_params({})
        return self.run_id

    def _log_params(self, logged: dict[str, str]) -> None:
        """The flattened config; MLflow's params cannot change, so on resume only new keys are
        added (the run's config.yaml holds the values of its last sitting)."""
        from mlflow.entities import Param

        params = [
            Param(key, str(value)[:500])  # 500: the shortest value MLflow 2 accepts
            for key, value in _flatten(self.config.to_dict()).items()
            if key not in logged
        ]
        for start in range(0, len(params), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])


CLASSES: dict[str, type[Logger]] = {
    "jsonl": JsonlLogger,
    "tensorboard": TensorBoardLogger,
    "mlflow": MlflowLogger,
}
assert tuple(CLASSES) == LOGGERS, "a logger of config.LOGGERS without its class, or the reverse"


class RunLog:
    """Every logger of train.loggers, written together: what the training loop writes to."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    @classmethod
    def open(cls, run: Run, config: Config) -> RunLog:
        return cls([CLASSES[name](run, config) for name in config.train.loggers])

    def write(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.write(record)

    def truncate_after(self, step: int) -> None:
        """A resumed run goes on after `step`: what the loggers hold of later steps is redone."""
        for logger in self.loggers:
            logger.truncate_after(step)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        status = "finished" if kind is None else "killed" if kind is KeyboardInterrupt else "failed"
        for logger in self.loggers:
            logger.close(status)


def append(run: Run, record: dict[str, Any]) -> None:
    """A line written after training (an evaluation's or the statistics' results): into
    metrics.jsonl and into each logger of the run's train.loggers, MLflow's into the run it
    trained in. A logger whose library is not installed here is left out with a warning: the
    results stay in metrics.jsonl."""
    loggers: list[Logger] = []
    for name in run.config.train.loggers:
        if name in LIBRARIES and missing(LIBRARIES[name][0]):
            log.warning(f"{name} is not installed here: this result is in metrics.jsonl only")
            continue
        logger = CLASSES[name](run, run.config)
        if isinstance(logger, MlflowLogger):
            logger.run_id = logger.find_run()  # None: a new MLflow run holds it
        loggers.append(logger)
    with RunLog(loggers) as out:
        out.write(record)


def _kept(metrics_path: Path, step: int) -> list[dict[str, Any]]:
    return [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step]


def _metric_name(name: str) -> str:
    """MLflow's metric names allow letters, digits and _ - . / and spaces; anything else
    (a dataset path in a transfer result) becomes _."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.3}} -> {"optim.lr": 0.3}; an empty mapping is left out."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
