"""The benchmark scripts stay runnable (budget comparisons: `selfsup compare`, test_compare.py)."""

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from streaming import main as streaming  # noqa: E402
from throughput import measure  # noqa: E402


def test_throughput_reports_speed_efficiency_and_the_backbone_work_of_a_step(tiny_config, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    r = measure(str(recipe), [], steps=1, warmup=1)
    assert r["img_per_s"] > 0 and r["efficiency"] > 0 and 0 < r["augment_share"] < 1
    assert r["backbone_work"] == "64 fb + 0 f"  # SimCLR: both views of 32 images, with gradient


def test_streaming_compares_decoding_in_memory_with_the_mapped_cache(capsys):
    streaming(
        ["--images", "40", "--size", "16", "--steps", "2", "--train-steps", "1", "--batch", "8"]
    )
    table = capsys.readouterr().out
    for row in ("read into memory", "build the cache", "open the built cache", "from mapped file"):
        assert row in table
