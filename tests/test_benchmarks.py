"""The benchmark scripts stay runnable (budget comparisons: `selfsup compare`, test_compare.py)."""

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
from step_profile import RUN_PARTS, STEP_PARTS, compile_verdict, instrumented_step  # noqa: E402
from streaming import main as streaming  # noqa: E402
from throughput import build, measure  # noqa: E402


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
