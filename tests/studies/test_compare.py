"""`selfsup compare`: same budget, same data and backbone, reused and resumed runs, one table."""

import importlib
import json
from pathlib import Path

import pytest
import yaml

from selfsup.cli import main
from selfsup.run import Run
from selfsup.studies.compare import compare

# the module (selfsup.studies.compare, the attribute, is the function)
runs_module = importlib.import_module("selfsup.studies.runs")


@pytest.fixture
def recipes(tiny_config, tmp_path):
    """Two tiny recipes on the same data and backbone: SimCLR and BYOL."""
    tiny_config["train"].update(knn_every=1)
    tiny_config["eval"].update(linear_epochs=5)
    simclr = tmp_path / "simclr.yaml"
    simclr.write_text(yaml.safe_dump(tiny_config))
    byol = tmp_path / "byol.yaml"
    tiny_config["method"] = {"name": "byol", "dim": 16, "hidden": 32}
    byol.write_text(yaml.safe_dump(tiny_config))
    return [str(simclr), str(byol)]


def test_compare_trains_each_recipe_and_seed_at_the_budget_and_writes_the_table(recipes, tmp_path):
    out = tmp_path / "compare"
    table = compare(recipes, minutes=0.05, seeds=[0, 1], out=out)
    assert [row["recipe"] for row in table["rows"]] == recipes
    assert len(table["runs"]) == 4
    for r in table["runs"]:
        run = Run(r["run"])
        budget = next(m for m in run.metrics if m.get("event") == "budget")
        assert budget["budget_minutes"] == 0.05 and run.config.train.seed == r["seed"]
        assert r["epochs"] == run.epochs > 0  # the length trained (a re-plan may change it)
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["linear_top1"] <= 100
        assert r["img_per_s"] > 0 and r["train_seconds"] > 0
        times = [t for t, _ in r["knn_curve"]]
        assert times and times == sorted(times)  # the kNN monitor against training time
    row = table["rows"][0]
    seeds = [r for r in table["runs"] if r["recipe"] == recipes[0]]
    assert row["knn_top1"] == pytest.approx(sum(r["knn_top1"] for r in seeds) / 2)
    assert row["knn_top1_std"] == pytest.approx(
        abs(seeds[0]["knn_top1"] - seeds[1]["knn_top1"]) / 2**0.5
    )
    text = (out / "compare.md").read_text()
    assert "± " in text and "raw pixels" in text and recipes[1] in text
    assert json.loads((out / "compare.json").read_text())["pixels"] == table["pixels"]
    assert (out / "compare.png").stat().st_size > 0


def test_finished_runs_are_reused_and_an_interrupted_one_is_resumed(recipes, tmp_path, monkeypatch):
    out = tmp_path / "compare"
    first = compare(recipes[:1], minutes=0.05, out=out)
    calls = []
    monkeypatch.setattr(
        runs_module, "train", lambda *a, **k: calls.append((a, k)) or pytest.fail("retrained")
    )
    again = compare(recipes[:1], minutes=0.05, out=out)
    assert not calls and again["runs"] == first["runs"]  # reused: nothing trained or evaluated

    # an interrupted run (no "end" event yet) is resumed, not restarted
    run = Run(first["runs"][0]["run"])
    lines = run.metrics_path.read_text().splitlines()
    run.metrics_path.write_text("\n".join(l for l in lines if '"end"' not in l) + "\n")
    (run.path / "eval.json").unlink()
    resumed = []
    monkeypatch.setattr(runs_module, "train", lambda **k: resumed.append(k) or Run(k["resume"]))
    compare(recipes[:1], minutes=0.05, out=out)
    assert resumed == [{"resume": run.path}]


def test_a_reused_folder_made_with_other_settings_is_refused(recipes, tmp_path):
    out = tmp_path / "compare"
    compare(recipes[:1], minutes=0.05, out=out)
    with pytest.raises(ValueError, match="other settings.*train.budget_minutes.*another --out"):
        compare(recipes[:1], minutes=0.1, out=out)
    with pytest.raises(ValueError, match="other settings.*optim"):
        compare(recipes[:1], minutes=0.05, overrides=["optim.lr=0.1"], out=out)


def test_recipes_on_different_backbones_are_refused_with_the_fix(recipes, tmp_path):
    other = yaml.safe_load(Path(recipes[1]).read_text())
    other["backbone"]["width"] = 0.25
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(other))
    with pytest.raises(ValueError, match=r"(?s)same backbone.*--set backbone\.<key>"):
        compare([recipes[0], str(path)], minutes=0.05, out=tmp_path / "c")


@pytest.mark.parametrize(
    ("minutes", "seeds", "message"), [(0, [0], "minutes"), (1, [0, 0], "seeds")]
)
def test_bad_budget_or_seeds_are_refused(recipes, tmp_path, minutes, seeds, message):
    with pytest.raises(ValueError, match=message):
        compare(recipes, minutes=minutes, seeds=seeds, out=tmp_path / "c")


def test_the_command_prints_the_table(recipes, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", recipes[0], "--minutes", "0.05", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| recipe | img/s | epochs |" in printed and str(out / "compare.md") in printed


def test_a_collapsed_run_is_reported_as_collapsed_and_not_resumed(
    recipes, tmp_path, monkeypatch, collapsed_simclr
):
    out = tmp_path / "compare"
    monkeypatch.setattr(importlib.import_module("selfsup.engine.collapse"), "PATIENCE", 1)
    table = compare(recipes, minutes=0.05, out=out)  # the guard stops SimCLR's run
    simclr, byol = table["rows"]
    assert simclr["collapsed"] == 1 and byol["collapsed"] == 0
    assert "collapsed_at_step" in table["runs"][0] and byol["knn_top1"] >= 0
    text = (out / "compare.md").read_text()
    assert f"| {recipes[0]} | – | – | – | collapsed | collapsed |" in text
    monkeypatch.setattr(runs_module, "train", lambda *a, **k: pytest.fail("retrained"))
    assert compare(recipes, minutes=0.05, out=out)["rows"][0]["collapsed"] == 1
