"""The benchmark scripts stay runnable (budget comparisons: `selfsup compare`, test_compare.py)."""

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from throughput import measure  # noqa: E402


def test_throughput_reports_speed_efficiency_and_the_backbone_work_of_a_step(tiny_config, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    r = measure(str(recipe), [], steps=1, warmup=1)
    assert r["img_per_s"] > 0 and r["efficiency"] > 0 and 0 < r["augment_share"] < 1
    assert r["backbone_work"] == "64 fb + 0 f"  # SimCLR: both views of 32 images, with gradient
