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
        planned = budget.FIRST_PLAN * 60 * config.train.budget_minutes  # what fit_budget fills
        return planned / (steps + 0.5), 0.0

    monkeypatch.setattr(budget, "measure", measure)
    # the loop's re-plan would read the real clock, on which these steps take no time
    monkeypatch.setattr(budget.Replan, "at_step", property(lambda self: None))


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
    assert event["total_steps"] == round(epochs * 10)
    # the loop's re-plan (its own step time) chose the run's length; config.yaml records it
    # (none when a loaded machine plans a single step)
    replan = next((r for r in budgeted_run.metrics if r.get("event") == "replan"), event)
    assert budgeted_run.config.train.replan == (
        (replan["step"], replan["total_steps"]) if replan is not event else None
    )
    assert budgeted_run.checkpoint()["step"] == replan["total_steps"]
    scaled_warmup = budgeted_run.config.optim.warmup_epochs
    tiny_config["train"].update(
        budget_minutes=None, epochs=epochs, replan=budgeted_run.config.train.replan
    )
    tiny_config["train"]["name"] = "replay"
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
    chosen, record, _ = fit_budget(config, load_data(config, "train"))
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
    chosen, record, _ = fit_budget(config, load_data(config, "train"))
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
    chosen, _, _ = fit_budget(config, data)
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
    chosen, record, _ = fit_budget(wanted, load_data(wanted, "train"))
    run = SimpleNamespace(path="run", config=chosen, metrics=[{"event": "budget", **record}])
    check_reusable(run, wanted, 1.0)  # its schedules are the recipe's, scaled as recorded
    with pytest.raises(ValueError, match=r"other settings \(train.epochs\)"):
        check_reusable(run, wanted.replace(["train.epochs=4"]), 1.0)


# A budget on a fake clock: the time source the budget reads (budget.time.perf_counter) moves
# only when a training step ends: by CALIBRATION_SECONDS in fit_budget's calibration, by the
# given seconds in the run's own loop.
CALIBRATION_SECONDS = 1.5  # calibration's 10 steps (2 warm-up, 8 timed) take a quarter of it
BUDGET_SECONDS = 60.0  # budgeted(): train.budget_minutes 1.0


def run_on_a_fake_clock(
    tiny_config, monkeypatch, loop_seconds: float = CALIBRATION_SECONDS, config=None
) -> tuple[Run, float, float]:
    """The budgeted run, the fake time at which its calibration (fit_budget) ended, and the fake
    time at which the whole run ended."""
    now, calibrating = [0.0], [False]
    monkeypatch.setattr(budget, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    real_step, real_fit = Parts.step, train_module.fit_budget

    def step(parts, number):
        out = real_step(parts, number)
        now[0] += CALIBRATION_SECONDS if calibrating[0] else loop_seconds
        return out

    calibrated = []

    def fit(*args, **kwargs):
        calibrating[0] = True
        out = real_fit(*args, **kwargs)
        calibrating[0] = False
        calibrated.append(now[0])
        return out

    monkeypatch.setattr(Parts, "step", step)
    monkeypatch.setattr(train_module, "fit_budget", fit)
    run = selfsup.train(config or budgeted(tiny_config))
    return run, calibrated[0], now[0]


def test_a_budgeted_run_plans_its_steps_in_the_time_left_after_calibrating(
    tiny_config, monkeypatch
):
    run, calibration, end = run_on_a_fake_clock(tiny_config, monkeypatch)
    # calibrating took so much of the budget that a plan ignoring it would overrun
    assert budget.FIRST_PLAN * BUDGET_SECONDS + calibration > BUDGET_SECONDS
    event = next(r for r in run.metrics if r.get("event") == "budget")
    # fit_budget's documented margin: FIRST_PLAN of what is left after calibrating
    planned = int(budget.FIRST_PLAN * (BUDGET_SECONDS - calibration) / CALIBRATION_SECONDS)
    assert event["total_steps"] == planned == 29


@pytest.mark.parametrize("loop_seconds", [1.0, 1.5, 2.0])
def test_a_budgeted_run_calibration_included_ends_within_3_percent_of_the_budget(
    tiny_config, monkeypatch, loop_seconds
):
    # the run's own steps as fast as calibration's, a third faster, a third slower: planned
    # from calibration alone the last two would end at 44 s and 73 s of 60
    run, calibration, end = run_on_a_fake_clock(tiny_config, monkeypatch, loop_seconds)
    assert abs(end - BUDGET_SECONDS) <= 0.03 * BUDGET_SECONDS
    replan = next(r for r in run.metrics if r.get("event") == "replan")
    assert replan["step"] == round(budget.REPLAN_AT * 29) == 3
    assert replan["img_per_s"] == round(32 / loop_seconds, 1) and replan["planned_steps"] == 29
    assert run.checkpoint()["step"] == replan["total_steps"] == run.config.train.replan[1]
    assert run.config.train.replan == (3, replan["total_steps"])


def test_a_replanned_run_keeps_its_first_steps_ends_its_schedules_and_replays_from_config_yaml(
    tiny_config, monkeypatch
):
    tiny_config["optim"].update(final_lr=1e-3, weight_decay=1e-2, final_weight_decay=1e-1)
    run, _, _ = run_on_a_fake_clock(tiny_config, monkeypatch, loop_seconds=2.0)
    k, steps = run.config.train.replan
    assert steps < 29  # slower steps: fewer than planned
    data = load_data(run.config, "train")
    schedule = Parts.build(run.config, data).schedule
    planned = Parts.build(run.config.replace(["train.replan=null"]), data).schedule
    assert planned.total_steps == schedule.total_steps == 29  # the plan: train.epochs
    # every step before the re-plan is the planned one, bit for bit; the last ends the cosines
    assert all(schedule.learning_rate(s) == planned.learning_rate(s) for s in range(k))
    assert schedule.position(steps) == 29 and math.isclose(schedule.learning_rate(steps), 1e-3)
    schedule.apply(steps)
    assert schedule.optimizer.param_groups[0]["weight_decay"] == pytest.approx(1e-1)
    # the rest of the schedule, stretched evenly
    assert schedule.position(k + 1) - schedule.position(k) == pytest.approx((29 - k) / (steps - k))
    monkeypatch.setattr(budget, "measure", _no_measuring)
    replay = selfsup.train(run.path / "config.yaml", ["train.name=replay"])
    assert replay.checkpoint()["step"] == steps and weights_equal(run, replay)


def test_the_replan_comes_after_a_tenth_of_the_planned_steps_and_before_the_last():
    def at(planned: int) -> int | None:
        return budget.Replan(60.0, planned, 10, 0.0, 0.0).at_step

    assert [at(1), at(2), at(9), at(29), at(840)] == [None, 1, 1, 3, 84]
