"""The benchmark scripts stay runnable (budget comparisons: `selfsup compare`, test_compare.py)."""

import importlib
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import memory  # noqa: E402
import step_profile  # noqa: E402
import time_to_accuracy  # noqa: E402
from step_profile import RUN_PARTS, STEP_PARTS, compile_verdict, instrumented_step  # noqa: E402
from streaming import main as streaming  # noqa: E402
from throughput import build, measure  # noqa: E402
from time_to_accuracy import verdict  # noqa: E402


def test_throughput_reports_speed_efficiency_and_the_backbone_work_of_a_step(tiny_config, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    r = measure(str(recipe), [], steps=1, warmup=1)
    assert r["img_per_s"] > 0 and r["efficiency"] > 0 and 0 < r["augment_share"] < 1
    assert r["backbone_work"] == "64 fb + 0 f"  # SimCLR: both views of 32 images, with gradient


def test_memory_reads_the_resident_and_the_in_use_memory_every_few_steps(
    tiny_config, tmp_path, capsys
):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    arguments = ["--steps", "4", "--every", "2", "--warmup", "2", "--set", "train.log_every=2"]
    (r,) = memory.main([str(recipe), *arguments])  # in a spawned process, on one thread
    assert list(r["resident_mib"]) == list(r["in_use_mib"]) == [0, 2, 4]
    assert r["start"] == 2 and r["threads"] == 1
    assert all(mib > 0 for mib in (*r["resident_mib"].values(), *r["in_use_mib"].values()))
    assert abs(r["in_use_growth"]) < 100
    table = capsys.readouterr().out
    assert "| in use, step 2 → 4 |" in table and str(recipe) in table


def test_streaming_compares_decoding_in_memory_with_the_mapped_cache(capsys):
    streaming(
        ["--images", "40", "--size", "16", "--steps", "2", "--train-steps", "1", "--batch", "8"]
    )
    table = capsys.readouterr().out
    for row in ("read into memory", "build the cache", "open the built cache", "from mapped file"):
        assert row in table


def test_step_profile_splits_a_step_into_parts_that_add_up_to_it(
    tiny_config, tmp_path, capsys, monkeypatch
):
    # On a busy machine other processes' time slices land in single steps of wall time: timed
    # here by the process's CPU time, on one thread (two would spin-wait for each other).
    monkeypatch.setattr(step_profile, "CLOCK", time.process_time)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "profile.json"
    threads = torch.get_num_threads()
    try:
        results = step_profile.main(
            [str(recipe), "--steps", "5", "--warmup", "2", "--threads", "1", "--json", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    r = results["recipes"][str(recipe)]["eager"]
    assert list(r["ms"]) == [*STEP_PARTS, *RUN_PARTS]
    assert all(ms >= 0 for ms in r["ms"].values())
    assert r["ms"]["backbone forward"] > 0 and r["ms"]["backward"] > 0
    assert r["ms"]["kNN monitor"] > 0 and r["ms"]["checkpoint"] > 0  # the tiny run has both
    assert sum(r["ms"][p] for p in STEP_PARTS) == pytest.approx(r["step_parts_ms"])
    assert sum(r["percent"].values()) == pytest.approx(100)
    # the instrumented steps take what the plain ones take (loose, for a busy machine)
    assert 0.5 <= r["step_parts_ms"] / r["whole_step_ms"] <= 1.5, r
    assert json.loads(out.read_text())["recipes"][str(recipe)]["eager"]["ms"] == r["ms"]
    table = capsys.readouterr().out
    assert all(name in table for name in (*STEP_PARTS, *RUN_PARTS, "whole step, plain"))


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_the_profiled_step_is_the_engines_step(method, tiny_config, tmp_path):
    """step_profile.instrumented_step mirrors Parts.step: the same losses and the same weights,
    optimizer state and method state (MoCo: key encoder and queue) after two steps."""
    if method == "moco":
        tiny_config["method"] = {
            "name": "moco",
            "dim": 32,
            "mlp_hidden": 64,
            "queue_size": 64,
            "shuffle_bn_groups": 2,
        }
    tiny_config["optim"]["clip"] = 1.0
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    _, _, profiled = build(str(recipe), [])
    profiled_losses = [
        instrumented_step(profiled, step, lambda: None)[0]["loss"].item() for step in range(2)
    ]
    _, _, engine = build(str(recipe), [])
    engine_losses = [engine.step(step)["loss"].item() for step in range(2)]
    assert profiled_losses == engine_losses
    for name, value in engine.method.state_dict().items():
        assert torch.equal(profiled.method.state_dict()[name], value), name
    a, b = profiled.optimizer.state_dict()["state"], engine.optimizer.state_dict()["state"]
    assert a.keys() == b.keys()
    for key in a:
        for name, value in a[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[key][name])), name


def test_compiling_pays_when_the_faster_steps_win_its_time_back_within_the_budget():
    eager = {"total_ms": 100.0}
    # 20 % faster steps win back 60 s of compiling after 60 / 0.2 = 300 s of training
    verdict = compile_verdict(eager, {"total_ms": 80.0, "compile_seconds": 60.0}, budget=15)
    assert verdict["break_even_minutes"] == pytest.approx(5.0) and verdict["pays"]
    assert not compile_verdict(eager, {"total_ms": 80.0, "compile_seconds": 600.0}, 15)["pays"]
    never = compile_verdict(eager, {"total_ms": 105.0, "compile_seconds": 1.0}, 15)
    assert never["break_even_minutes"] is None and not never["pays"]


def test_time_to_accuracy_stops_at_the_budget_that_reaches_both_marks_and_reuses_runs(
    tiny_config, tmp_path, monkeypatch, capsys
):
    runs_module = importlib.import_module("selfsup.studies.runs")
    tiny_config["data"].update(num_classes=4, per_class=16)
    tiny_config["optim"]["batch_size"] = 8
    tiny_config["train"].update(knn_every=0, collapse_guard=False)
    tiny_config["eval"].update(linear_epochs=5)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "tta"
    entries = [f"tiny:before={recipe}", f"tiny:after={recipe},optim.lr=0.1,views.scale=[0.5,1.0]"]
    grid = ["--minutes", "0.06", "0.03", "--seeds", "0", "--out", str(out)]

    # both marks reached by the first budget: the second is not trained
    report = time_to_accuracy.main([*entries, *grid, "--knn-mark", "0", "--linear-mark", "0"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0.03min"]
    (row,) = report["methods"]
    for arm in ("before", "after"):
        first = report["results"][f"tiny:{arm}"]
        assert [r["budget"] for r in first] == [0.03]
        for name in ("knn", "linear"):
            assert row[arm][name] == {
                "minutes": first[0]["train_seconds"] / 60,
                "reached": True,
                "budget": 0.03,
            }
    assert row["after"]["recipe"] == f"{recipe} optim.lr=0.1 views.scale=[0.5,1.0]"
    before, after = (report["results"][f"tiny:{arm}"][0] for arm in ("before", "after"))
    ratio = after["train_seconds"] / before["train_seconds"]
    assert row["knn_ratio"] == row["linear_ratio"] == f"{ratio:.2f}"
    assert row["half"] == (ratio <= 0.5)
    if not row["half"]:
        assert (
            row["verdict"]
            == f"knn: {ratio:.2f} of the before-time; linear: {ratio:.2f} of the before-time"
        )

    # an unreachable linear mark: every entry climbs to the largest budget, which says so
    trained = []
    train = runs_module.train
    monkeypatch.setattr(runs_module, "train", lambda *a, **k: trained.append(k) or train(*a, **k))
    report = time_to_accuracy.main([*entries, *grid, "--knn-mark", "0", "--linear-mark", "101"])
    assert len(trained) == 2  # the 0.06-minute runs only: the 0.03-minute ones are reused
    (row,) = report["methods"]
    for arm in ("before", "after"):
        rows = report["results"][f"tiny:{arm}"]
        assert [r["budget"] for r in rows] == [0.03, 0.06]
        assert row[arm]["knn"]["reached"] and row[arm]["knn"]["budget"] == 0.03
        assert row[arm]["linear"] == {
            "minutes": rows[1]["train_seconds"] / 60,
            "reached": False,
            "budget": 0.06,
        }
    assert "linear: after not reached within" in row["verdict"] and not row["half"]
    text = (out / "time_to_accuracy.md").read_text()
    assert f"> {rows[1]['train_seconds'] / 60:.1f}" in text and "--linear-mark 101" in text
    assert json.loads((out / "time_to_accuracy.json").read_text())["marks"]["linear"] == 101
    assert text in capsys.readouterr().out and "2 of the 4 runs were made" in text

    # a rerun trains nothing
    trained.clear()
    again = time_to_accuracy.main([*entries, *grid, "--knn-mark", "0", "--linear-mark", "101"])
    assert not trained and again["results"] == report["results"]
    assert "4 of the 4 runs were made by an earlier call" in capsys.readouterr().out

    # the ratio bounds a time the before arm did not reach within its largest budget
    assert verdict({"minutes": 16.2, "reached": False}, {"minutes": 6.0, "reached": True})[:2] == (
        "< 0.37",
        True,
    )
    assert verdict({"minutes": 8.0, "reached": True}, None)[2] == "no after-recipe yet"


def test_the_default_time_to_accuracy_entries_are_recipes_the_config_accepts():
    """Every default entry (an after-recipe may carry overrides) resolves to a config."""
    from selfsup.config import load_config

    entries = [time_to_accuracy.parse_entry(text) for text in time_to_accuracy.default_entries()]
    assert {e["method"] for e in entries} == set(time_to_accuracy.METHODS)
    for entry in entries:
        load_config(entry["recipe"], entry["overrides"])  # raises on an unknown key or value
    simclr_after = next(e for e in entries if e["label"] == "simclr:after")
    config = load_config(simclr_after["recipe"], simclr_after["overrides"])
    assert (config.backbone["width"], config.views["image_size"]) == (0.25, 28)
