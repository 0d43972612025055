"""`selfsup momentum`: each recipe trained with a stop-gradient and with a momentum target, probed
and its gradient decomposed; runs reused; bad input refused where it enters."""

import contextlib
import importlib
import json

import pytest
import yaml

from selfsup.cli import main
from selfsup.run import Run
from selfsup.studies.momentum import momentum_experiment

momentum_module = importlib.import_module("selfsup.studies.momentum")
runs_module = importlib.import_module("selfsup.studies.runs")


@pytest.fixture
def recipe(study_config, tmp_path):
    """A tiny SimCLR recipe (conftest's study_config)."""
    path = tmp_path / "simclr.yaml"
    path.write_text(yaml.safe_dump(study_config))
    return str(path)


def test_both_arms_are_trained_probed_decomposed_tabulated_and_reused(
    recipe, tmp_path, monkeypatch
):
    out = tmp_path / "momentum"
    study = dict(epochs=1, overrides=["train.max_steps=2"], out=out, batches=1)
    table = momentum_experiment([recipe], **study)
    (row,) = table["rows"]
    assert row["method"] == "simclr"
    for arm in ("stop_gradient", "momentum"):
        run = Run(row[arm]["run"])
        assert run.config.train.target == arm and run.path.name == f"simclr-{arm}-seed0"
        target = run.method.target_branch
        assert target.kind == arm and (target.ema is not None) == (arm == "momentum")
        stored = json.loads((run.path / "eval.json").read_text())
        assert row[arm]["linear_top1"] == stored["linear_top1"]
        gradients = json.loads((run.path / "gradients.json").read_text())
        assert gradients["batches"] == 1
        assert row[arm]["gradients"]["balance"] == gradients["balance"]
    # the momentum network started as a copy and moved by the EMA: not the online weights
    momentum = Run(row["momentum"]["run"]).method
    online, ema = momentum.target_branch.online, momentum.target_branch.ema.copies
    first = next(iter(online[0].parameters()))
    assert not first.equal(next(iter(ema[0].parameters())))

    lines = (out / "momentum.md").read_text().splitlines()
    body = [line for line in lines if line.startswith(f"| {recipe} |")]
    assert len(body) == 1
    cells = body[0].strip("| ").split(" | ")
    sg, mom = row["stop_gradient"], row["momentum"]
    change = mom["knn_top1"] - sg["knn_top1"]
    assert cells[2:5] == [f"{sg['knn_top1']:.2f}", f"{mom['knn_top1']:.2f}", f"{change:+.2f}"]
    assert json.loads((out / "momentum.json").read_text())["rows"] == table["rows"]

    monkeypatch.setattr(runs_module, "train", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(runs_module, "evaluate", lambda *a, **k: pytest.fail("probed again"))
    monkeypatch.setattr(
        momentum_module, "gradient_decomposition", lambda *a, **k: pytest.fail("decomposed again")
    )
    assert momentum_experiment([recipe], **study)["rows"] == table["rows"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--set", "train.target=momentum"], "sets train.target itself"),
        (["--batches", "0"], "--batches must be >= 1"),
        (["--epochs", "1", "--minutes", "1"], "not allowed with argument"),
    ],
)
def test_bad_options_are_one_line_errors(recipe, arguments, message, capsys):
    with pytest.raises(SystemExit) if "--minutes" in arguments else contextlib.nullcontext():
        assert main(["momentum", recipe, *arguments]) == 2
    assert message in capsys.readouterr().err


def test_a_method_without_the_switch_is_refused_naming_those_with_it(capsys):
    assert main(["momentum", "instdisc/fashion_mnist", "--epochs", "1"]) == 2
    error = capsys.readouterr().err
    assert "method 'instdisc', which has no stop-gradient/momentum switch" in error
    assert "simclr" in error and "byol" in error
