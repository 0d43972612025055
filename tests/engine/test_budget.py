"""A time budget (train.budget_minutes): the epochs it chooses, every schedule in epochs scaled to
them, and a config.yaml that replays the run without the budget."""

import math
from types import SimpleNamespace

import pytest
import torch
import yaml

import selfsup
import selfsup.engine.budget as budget
import selfsup.engine.train as train_module
from selfsup.build import load_data
from selfsup.config import apply_overrides, load_config, recipe_names, resolve
from selfsup.engine.budget import fit_budget, in_epochs, scale_schedules
from selfsup.engine.parts import Parts
from selfsup.run import Run
from selfsup.schedules import cosine, cosine_ramp

# tiny_config: 320 synthetic images in batches of 32, train.epochs 2, optim.warmup_epochs 1
STEPS_PER_EPOCH, NOMINAL_EPOCHS = 10, 2


def fill_budget_with(monkeypatch, steps: int) -> None:
    """The budget's measurement, faked: a step takes the time that fills it with `steps` steps
    (and half a step for the moments the fake itself takes), so the choice is deterministic."""

    def measure(config, data, *args):
        planned = 0.92 * 60 * config.train.budget_minutes  # what fit_budget plans to fill
        return planned / (steps + 0.5), 0.0

    monkeypatch.setattr(budget, "measure", measure)


def budgeted(tiny_config, **train):
    tiny_config["train"].update(budget_minutes=1.0, knn_every=0, collapse_guard=False, **train)
    return resolve(tiny_config)


def weights_equal(a: Run, b: Run) -> bool:
    x, y = a.checkpoint()["method"], b.checkpoint()["method"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_budget_chooses_the_epochs_records_them_and_the_run_replays_exactly(tiny_config):
    # the machine's own throughput, measured: the one test of the real measurement
    tiny_config["train"].update(budget_minutes=0.05, knn_every=0, log_every=1)
    budgeted_run = selfsup.train(resolve(tiny_config))
    event = next(r for r in budgeted_run.metrics if r.get("event") == "budget")
    epochs = budgeted_run.config.train.epochs
    assert budgeted_run.config.train.budget_minutes is None  # a resume does not measure again
    assert epochs == event["epochs"] and event["img_per_s"] > 0
    assert event["nominal_epochs"] == NOMINAL_EPOCHS and event["scale"] == epochs / NOMINAL_EPOCHS
    assert budgeted_run.checkpoint()["step"] == event["total_steps"] == round(epochs * 10)
    scaled_warmup = budgeted_run.config.optim.warmup_epochs
    tiny_config["train"].update(budget_minutes=None, epochs=epochs, name="replay")
    tiny_config["optim"].update(warmup_epochs=scaled_warmup)
    replay = selfsup.train(resolve(tiny_config))
    assert weights_equal(budgeted_run, replay)


@pytest.mark.parametrize(("steps", "scale"), [(5, 0.25), (30, 1.5)])
def test_a_shorter_or_longer_budget_scales_every_schedule_in_epochs_by_chosen_over_nominal(
    tiny_config, monkeypatch, steps, scale
):
    fill_budget_with(monkeypatch, steps)
    tiny_config["optim"]["groups"] = {"projector": {"lr": 0.1, "frozen_epochs": 0.4}}
    config = budgeted(tiny_config)
    chosen, record = fit_budget(config, load_data(config, "train"))
    assert chosen.train.epochs == steps / STEPS_PER_EPOCH == NOMINAL_EPOCHS * scale
    assert chosen.train.budget_minutes is None
    assert chosen.optim.warmup_epochs == 1 * scale  # the warm-up keeps its share of the run
    assert chosen.optim.groups["projector"].frozen_epochs == 0.4 * scale
    assert chosen.optim.groups["projector"].lr == 0.1
    # not schedules of training: the probe's iterations, the monitor's interval
    assert chosen.eval.linear_epochs == config.eval.linear_epochs
    assert chosen.train.knn_every == config.train.knn_every
    assert record["scale"] == scale and record["nominal_epochs"] == NOMINAL_EPOCHS
    assert record["scaled"] == {
        "optim.warmup_epochs": 1 * scale,
        "optim.groups.projector.frozen_epochs": 0.4 * scale,
    }
    replay = budget.replay_overrides(chosen, record)  # what the log and the demo print
    tiny_config["train"]["budget_minutes"] = None
    assert resolve(apply_overrides(tiny_config, replay)) == chosen


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (  # DINO's freeze given, its teacher-temperature warm-up left at the default (30)
            {"name": "dino", "out_dim": 64, "hidden": 32, "bottleneck": 16,
             "freeze_last_layer_epochs": 0.5},
            {"freeze_last_layer_epochs": 0.125, "teacher_temp_warmup_epochs": 7.5},
        ),
        (
            {"name": "swav", "dim": 16, "hidden": 32, "num_prototypes": 10,
             "freeze_prototypes_epochs": 0.4, "queue_size": 64, "queue_start_epoch": 1},
            {"freeze_prototypes_epochs": 0.1, "queue_start_epoch": 0.25},
        ),
    ],
)  # fmt: skip
def test_dino_and_swav_freezes_and_warm_ups_are_scaled_defaults_included(
    tiny_config, monkeypatch, method, expected
):
    fill_budget_with(monkeypatch, 5)  # 0.5 of 2 epochs
    tiny_config["method"] = method
    config = budgeted(tiny_config)
    chosen, record = fit_budget(config, load_data(config, "train"))
    assert {k: chosen.method[k] for k in expected} == expected
    scaled_method = {k: v for k, v in record["scaled"].items() if k.startswith("method.")}
    assert scaled_method == {f"method.{k}": v for k, v in expected.items()}
    assert {k: v for k, v in chosen.method.items() if k not in expected} == {
        k: v for k, v in config.method.items() if k not in expected
    }
    built = Parts.build(chosen, load_data(chosen, "train")).method  # the run builds these
    assert {k: getattr(built, k) for k in expected} == expected


def test_every_schedule_in_epochs_of_the_shipped_recipes_is_scaled_and_nothing_else():
    seen = set()
    for name in recipe_names():
        config = load_config(name)
        scaled, changed = scale_schedules(config, 0.5)
        before, after = _flat(config.to_dict()), _flat(scaled.to_dict())
        assert set(before) <= set(after), name  # defaults written in, nothing dropped
        for key, value in after.items():
            if in_epochs(key.rsplit(".", 1)[-1]) and not key.startswith(("train.", "eval.")):
                if key in before:
                    assert value == before[key] * 0.5, (name, key)
            else:
                assert value == before[key], (name, key)
        assert {k: after[k] for k in changed} == changed, name
        seen |= set(changed)
    assert seen >= {
        "optim.warmup_epochs",
        "method.freeze_last_layer_epochs",
        "method.teacher_temp_warmup_epochs",
        "method.freeze_prototypes_epochs",
        "method.queue_start_epoch",
    }


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def test_a_budgeted_run_writes_the_scaled_schedules_to_config_yaml_and_replays_from_it(
    tiny_config, monkeypatch
):
    fill_budget_with(monkeypatch, 5)
    tiny_config["optim"]["groups"] = {"projector": {"frozen_epochs": 0.4}}
    run = selfsup.train(budgeted(tiny_config))
    written = yaml.safe_load((run.path / "config.yaml").read_text())
    assert written["train"]["epochs"] == run.config.train.epochs == 0.5
    assert written["train"]["budget_minutes"] is None
    assert written["optim"]["warmup_epochs"] == 0.25
    assert written["optim"]["groups"]["projector"]["frozen_epochs"] == 0.1
    event = next(r for r in run.metrics if r.get("event") == "budget")
    assert event["scale"] == 0.25 and event["nominal_epochs"] == NOMINAL_EPOCHS
    assert run.checkpoint()["step"] == event["total_steps"] == 5

    monkeypatch.setattr(budget, "measure", _no_measuring)
    replay = selfsup.train(run.path / "config.yaml", ["train.name=replay"])
    assert replay.config == run.config.replace(["train.name=replay"])
    assert replay.checkpoint()["step"] == 5 and weights_equal(run, replay)


def test_a_resumed_budgeted_run_scales_nothing_twice(tiny_config, monkeypatch):
    fill_budget_with(monkeypatch, 5)
    stopped = selfsup.train(budgeted(tiny_config, max_steps=2))
    assert stopped.checkpoint()["step"] == 2 and stopped.config.optim.warmup_epochs == 0.25
    monkeypatch.setattr(budget, "measure", _no_measuring)
    resumed = selfsup.train(resume=stopped.path, overrides=["train.max_steps=null"])
    assert resumed.config.optim.warmup_epochs == 0.25 and resumed.config.train.epochs == 0.5
    assert resumed.checkpoint()["step"] == 5
    assert sum(r.get("event") == "budget" for r in resumed.metrics) == 1
    written = yaml.safe_load((resumed.path / "config.yaml").read_text())  # rewritten on resume
    assert written["optim"]["warmup_epochs"] == 0.25 and written["train"]["max_steps"] is None


def _no_measuring(*args):
    raise AssertionError("measured again: a config.yaml's schedules would be scaled twice")


def test_schedules_over_training_progress_end_with_the_budgeted_run_unscaled(
    tiny_config, monkeypatch
):
    # BYOL's EMA momentum (and DINO's, MoCo v3's, UniGrad's, train.target's) and the weight
    # decay's cosine run over progress.fraction of the run's own steps: the budget leaves them
    # alone. Were they in epochs, 5 steps of a 2-epoch (20-step) recipe would end a quarter in.
    fill_budget_with(monkeypatch, 5)
    tiny_config["method"] = {"name": "byol", "dim": 16, "hidden": 32, "momentum": 0.9}
    tiny_config["optim"].update(weight_decay=1e-2, final_weight_decay=1e-1, final_lr=1e-3)
    config = budgeted(tiny_config)
    data = load_data(config, "train")
    chosen, _ = fit_budget(config, data)
    assert chosen.method == config.method and chosen.optim.final_weight_decay == 1e-1
    parts = Parts.build(chosen, data)
    momenta, decays = [], []
    update = parts.method.target.update
    parts.method.target.update = lambda m: (momenta.append(m), update(m))
    for step in range(parts.schedule.total_steps):
        parts.step(step)
        decays.append(parts.optimizer.param_groups[0]["weight_decay"])
    total = parts.schedule.total_steps
    assert total == 5
    assert momenta == [cosine_ramp(0.9, 1.0, i / total) for i in range(total)]
    assert decays == [cosine(1e-2, 1e-1, i / total) for i in range(total)]
    parts.schedule.apply(total)  # the end of the run: the cosines' final values
    assert parts.optimizer.param_groups[0]["weight_decay"] == pytest.approx(1e-1)
    assert math.isclose(parts.schedule.learning_rate(total), 1e-3)


def test_a_study_reuses_a_budgeted_run_of_the_same_recipe_and_not_of_another_length(
    tiny_config, monkeypatch
):
    from types import SimpleNamespace

    from selfsup.studies.runs import check_reusable

    fill_budget_with(monkeypatch, 5)
    wanted = budgeted(tiny_config)
    chosen, record = fit_budget(wanted, load_data(wanted, "train"))
    run = SimpleNamespace(path="run", config=chosen, metrics=[{"event": "budget", **record}])
    check_reusable(run, wanted, 1.0)  # its schedules are the recipe's, scaled as recorded
    with pytest.raises(ValueError, match=r"other settings \(train.epochs\)"):
        check_reusable(run, wanted.replace(["train.epochs=4"]), 1.0)


# A budget on a fake clock: the time source the budget reads (budget.time.perf_counter) moves
# only when a training step ends, by STEP_SECONDS, in the calibration and in the run alike.
STEP_SECONDS = 3.0  # calibration's 10 steps (fit_budget: 2 warm-up, 8 timed) take half the budget
BUDGET_SECONDS = 60.0  # budgeted(): train.budget_minutes 1.0


def run_on_a_fake_clock(tiny_config, monkeypatch) -> tuple[Run, float, float]:
    """The budgeted run, the fake time at which its calibration (fit_budget) ended, and the fake
    time at which the whole run ended."""
    now = [0.0]
    monkeypatch.setattr(budget, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    real_step, real_fit = Parts.step, train_module.fit_budget

    def step(parts, number):
        out = real_step(parts, number)
        now[0] += STEP_SECONDS
        return out

    calibrated = []

    def fit(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        calibrated.append(now[0])
        return out

    monkeypatch.setattr(Parts, "step", step)
    monkeypatch.setattr(train_module, "fit_budget", fit)
    run = selfsup.train(budgeted(tiny_config))
    return run, calibrated[0], now[0]


def test_a_budgeted_run_plans_its_steps_in_the_time_left_after_calibrating(
    tiny_config, monkeypatch
):
    run, calibration, end = run_on_a_fake_clock(tiny_config, monkeypatch)
    # calibrating took so much of the budget that a plan ignoring it would overrun
    assert 0.92 * BUDGET_SECONDS + calibration > BUDGET_SECONDS
    planned = run.checkpoint()["step"]
    # fit_budget's documented margin: 92 % of what is left after calibrating
    assert planned == int(0.92 * (BUDGET_SECONDS - calibration) / STEP_SECONDS)
    assert end == calibration + planned * STEP_SECONDS <= BUDGET_SECONDS


@pytest.mark.xfail(
    strict=True,
    reason=(
        "fit_budget plans 0.92 x (budget - calibration) of steps (a margin for checkpoints, "
        "logging and steady steps measured 5-7 % slower than the first ones), so on a clock "
        "where steps cost what calibration measured the run ends at calibration + 0.92 x "
        "(budget - calibration): 57 s of 60 here (30 s calibrating, 9 planned steps of 3 s), "
        "5 % early"
    ),
)
def test_a_budgeted_run_calibration_included_ends_within_3_percent_of_the_budget(
    tiny_config, monkeypatch
):
    _, _, end = run_on_a_fake_clock(tiny_config, monkeypatch)
    assert abs(end - BUDGET_SECONDS) <= 0.03 * BUDGET_SECONDS
