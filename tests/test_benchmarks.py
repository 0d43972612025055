"""The benchmark scripts stay runnable: a budget run trains the planned epochs and evaluates."""

import sys
from pathlib import Path

import yaml

from selfsup.run import Run

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from budget import run_one  # noqa: E402
from throughput import measure  # noqa: E402


def test_budget_run_trains_the_epochs_its_budget_chose_and_evaluates(tiny_config, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    tiny_config["train"]["knn_every"] = 0
    recipe.write_text(yaml.safe_dump(tiny_config))
    row = run_one(str(recipe), [], minutes=0.05, out=tmp_path / "budget")
    run = Run(row["run"])
    assert row["epochs"] == run.config.train.epochs > 0
    steps_per_epoch = 10  # 320 images in batches of 32
    assert run.checkpoint()["step"] == round(row["epochs"] * steps_per_epoch)
    assert {"knn_top1", "linear_top1", "linear_weight_decay"} <= set(row)


def test_throughput_reports_speed_efficiency_and_the_backbone_work_of_a_step(tiny_config, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    r = measure(str(recipe), [], steps=1, warmup=1)
    assert r["img_per_s"] > 0 and r["efficiency"] > 0 and 0 < r["augment_share"] < 1
    assert r["backbone_work"] == "64 fb + 0 f"  # SimCLR: both views of 32 images, with gradient
