"""The benchmark scripts stay runnable: a budget run trains the planned epochs and evaluates."""

import sys
from pathlib import Path

import yaml

from selfsup.run import Run

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from budget import run_one  # noqa: E402


def test_budget_run_plans_epochs_from_throughput_trains_them_and_evaluates(tiny_config, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    tiny_config["train"]["knn_every"] = 0
    recipe.write_text(yaml.safe_dump(tiny_config))
    row = run_one(str(recipe), [], minutes=0.05, fill=0.9, out=tmp_path / "budget")
    images = 320  # synthetic: 10 classes x 32
    planned = round(0.05 * 60 * 0.9 * row["calibrated_img_per_s"] / images, 2)
    assert row["epochs"] == planned > 0
    steps_per_epoch = 10  # 320 images in batches of 32
    assert Run(row["run"]).checkpoint()["step"] == max(round(planned * steps_per_epoch), 1)
    assert {"knn_top1", "linear_top1", "linear_weight_decay"} <= set(row)
