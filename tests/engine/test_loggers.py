"""train.loggers: every number of metrics.jsonl reaches TensorBoard and MLflow at its step, read
back with each library's own reader; resume appends without repeating a step; a missing library
or an unknown name is one clear error before anything trains."""

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest

import selfsup
from selfsup.config import resolve


@pytest.fixture
def logged_config(tiny_config, monkeypatch):
    """tiny_config training 4 steps with every logger, its MLflow store in the run folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses the file store
    tiny_config["train"].update(
        max_steps=4, log_every=2, gradients_every=2, loggers=["jsonl", "tensorboard", "mlflow"]
    )
    return tiny_config


def jsonl_scalars(run):
    """Every number of metrics.jsonl as (step, value) under its logged name: the key, or
    <event>/<key> on an event's line."""
    out = defaultdict(list)
    for record in run.metrics:
        prefix = f"{record['event']}/" if "event" in record else ""
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[prefix + key].append((record["step"], value))
    return {name: sorted(points) for name, points in out.items()}


def tensorboard_scalars(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: sorted((event.step, event.value) for event in events.Scalars(tag))
        for tag in events.Tags()["scalars"]
    }


def mlflow_run(run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run.path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(run.path.name)
    (found,) = client.search_runs([experiment.experiment_id])
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, key))
        for key in found.data.metrics
    }
    return found, history


def assert_same(logged, expected, rel):
    assert sorted(logged) == sorted(expected)
    for name, points in expected.items():
        assert [step for step, _ in logged[name]] == [step for step, _ in points], name
        assert [value for _, value in logged[name]] == pytest.approx(
            [value for _, value in points], rel=rel
        ), name


def test_every_number_of_metrics_jsonl_reaches_tensorboard_and_mlflow_at_its_step(
    logged_config,
):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run = selfsup.train(resolve(logged_config))
    expected = jsonl_scalars(run)
    names = {"loss", "lr", "epoch", "knn_top1", "embed_std", "start/parameters"}
    assert names <= set(expected) and any(name.startswith("gradients/") for name in expected)
    assert [step for step, _ in expected["loss"]] == [2, 4]

    assert_same(tensorboard_scalars(run), expected, rel=1e-6)  # event files hold float32

    found, history = mlflow_run(run)
    assert_same(history, expected, rel=0)
    assert found.info.status == "FINISHED"
    assert found.data.params["optim.lr"] == str(run.config.optim.lr)
    assert found.data.params["train.loggers"] == str(["jsonl", "tensorboard", "mlflow"])
    assert found.data.tags["selfsup.run"] == str(run.path.resolve())


def test_a_resumed_run_appends_to_the_same_logs_without_repeating_a_step(logged_config):
    """Steps logged after the last checkpoint (a killed run) are redone on resume: TensorBoard
    hides the first try of them and MLflow does not log them twice."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    logged_config["train"].update(knn_every=0, gradients_every=0)
    run = selfsup.train(resolve(logged_config))  # steps 1-4, checkpoint at 4
    kept = run.path.parent / "checkpoint-at-4"
    shutil.copytree(run.path / "checkpoints", kept)
    selfsup.train(resume=run.path, overrides=["train.max_steps=6"])  # logs step 6 ...
    shutil.rmtree(run.path / "checkpoints")
    shutil.copytree(kept, run.path / "checkpoints")  # ... and is lost: its checkpoint was not
    run = selfsup.train(resume=run.path, overrides=["train.max_steps=8"])  # redoes 5-6, then 8

    expected = jsonl_scalars(run)
    assert [step for step, _ in expected["loss"]] == [2, 4, 6, 8]
    assert_same(tensorboard_scalars(run), expected, rel=1e-6)
    found, history = mlflow_run(run)
    for name in ("img_per_s", "seconds"):  # clock readings: step 6 keeps its first try's
        history.pop(name), expected.pop(name)
    assert_same(history, expected, rel=1e-6)  # the redone steps' losses are the same (exact resume)
    assert found.info.status == "FINISHED"


def test_mlflow_logs_to_the_tracking_uri_the_user_set(logged_config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "shared-store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    logged_config["train"].update(loggers="mlflow", knn_every=0, gradients_every=0)
    run = selfsup.train(resolve(logged_config))
    assert not (run.path / "mlruns").exists()
    client = MlflowClient(store)
    (found,) = client.search_runs([client.get_experiment_by_name(run.path.name).experiment_id])
    losses = [m.value for m in client.get_metric_history(found.info.run_id, "loss")]
    assert losses == [r["loss"] for r in run.metrics if "loss" in r]


def test_a_logger_named_on_resume_first_receives_the_run_so_far(logged_config):
    pytest.importorskip("tensorboard")
    logged_config["train"].update(loggers="jsonl", knn_every=0, gradients_every=0)
    run = selfsup.train(resolve(logged_config))
    assert not (run.path / "tensorboard").exists()
    run = selfsup.train(
        resume=run.path, overrides=["train.max_steps=6", "train.loggers=tensorboard"]
    )
    assert_same(tensorboard_scalars(run), jsonl_scalars(run), rel=1e-6)


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_logger_without_its_library_names_the_extra_before_anything_trains(
    tiny_config, monkeypatch, name
):
    monkeypatch.setitem(sys.modules, name, None)  # `import <name>` now fails
    tiny_config["train"]["loggers"] = ["jsonl", name]
    config = resolve(tiny_config)  # a run folder that names it stays readable
    with pytest.raises(ModuleNotFoundError, match=rf'pip install "selfsup\[{name}\]"'):
        selfsup.train(config)
    assert not os.path.exists(tiny_config["train"]["out_dir"]), "nothing was made"


def test_an_unknown_logger_lists_the_known_ones(tiny_config):
    tiny_config["train"]["loggers"] = ["jsonl", "tensorbord"]
    with pytest.raises(ValueError) as error:
        resolve(tiny_config)
    assert str(error.value) == (
        "unknown train.loggers name 'tensorbord' (did you mean 'tensorboard'?); "
        "known: jsonl, tensorboard, mlflow"
    )


def test_one_logger_name_is_a_list_that_starts_with_jsonl(tiny_config):
    tiny_config["train"]["loggers"] = "mlflow"
    assert resolve(tiny_config).train.loggers == ("jsonl", "mlflow")
    tiny_config["train"]["loggers"] = ["tensorboard", "jsonl", "tensorboard"]
    assert resolve(tiny_config).train.loggers == ("jsonl", "tensorboard")


def test_a_run_without_loggers_imports_neither_library(tiny_config):
    tiny_config["train"].update(max_steps=2, knn_every=0, collapse_guard=False)
    script = (
        "import json, sys, selfsup\n"
        "from selfsup.config import resolve\n"
        f"selfsup.train(resolve(json.loads({json.dumps(tiny_config)!r})))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorboard', 'mlflow'}))\n"
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_an_evaluation_after_training_reaches_the_runs_loggers(logged_config):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    logged_config["eval"].update(linear_epochs=3)
    run = selfsup.train(resolve(logged_config))
    results = selfsup.evaluate(run, ["knn"])
    expected = jsonl_scalars(run)
    assert expected["eval/knn_top1"] == [(4, results["knn_top1"])]
    assert_same(tensorboard_scalars(run), expected, rel=1e-6)
    found, history = mlflow_run(run)  # the run it trained in, not a second one
    assert history["eval/knn_top1"] == [(4, results["knn_top1"])]
    assert found.info.status == "FINISHED"


def _train_on_each_process(rank, config):
    import selfsup as package
    from selfsup.config import resolve as resolve_config

    run = package.train(resolve_config(config))
    return str(run.path)


def test_on_several_processes_only_rank_0_logs(logged_config):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from gloo import run_on_processes

    from selfsup.run import Run

    logged_config["train"].update(gradients_every=0)
    paths = run_on_processes(_train_on_each_process, 2, logged_config)
    assert paths[0] == paths[1]
    run = Run(paths[0])
    assert len(list((run.path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_same(tensorboard_scalars(run), jsonl_scalars(run), rel=1e-6)
    _, history = mlflow_run(run)  # one MLflow run: mlflow_run unpacks exactly one
    assert [step for step, _ in history["loss"]] == [2, 4]
