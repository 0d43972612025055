"""Stage-wise probes: one row per encoder stage and projector layer, each row's features the
stage's own, tables and chart of several runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import selfsup
from selfsup.backbones.vit import VisionTransformer
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.eval.stages import (
    StageFeatures,
    stage_features,
    stage_order,
    stage_probes,
)
from selfsup.heads import mlp, mlp_blocks
from selfsup.methods.cpc import PatchGridEncoder
from selfsup.probes.features import extract
from selfsup.run import Run

RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]
VIT_STAGES = ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]  # of a 12-block ViT


def tiny_run(root, name, method, backbone):
    """A run trained for two steps on 16x16 synthetic images, with a 5-iteration probe (one weight
    decay: evaluate's choice among candidates is linear_probe's, tested in test_eval.py)."""
    config = {
        "method": method,
        "backbone": backbone,
        "data": {"name": "synthetic", "per_class": 12, "size": 16},
        "views": {"name": "simclr", "size": 16, "blur_p": 0.0, "strength": 0.5},
        "optim": {"name": "sgd", "lr": 0.1, "batch_size": 32},
        "train": {"epochs": 1, "max_steps": 2, "knn_every": 0, "out_dir": str(root),
                  "name": name, "progress": False},
        "eval": {"linear_epochs": 5, "linear_weight_decay": 1e-4, "knn_k": 5},
    }  # fmt: skip
    return selfsup.train(resolve(config))


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
    method = {"name": "simclr", "hidden": 24, "dim": 12}
    backbone = {"name": "resnet18", "stem": "small", "width": 0.125}
    return tiny_run(tmp_path_factory.mktemp("runs"), "simclr", method, backbone)


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    backbone = {"name": "resnet18", "stem": "small", "width": 0.125}
    return tiny_run(tmp_path_factory.mktemp("runs"), "supervised", {"name": "supervised"}, backbone)


def images_of(run, count=40):
    return selfsup.build.load_data(run.config, "test").images[:count]


@pytest.fixture(scope="module")
def simclr_features(simclr_run):
    """(the reloaded run, 40 test images, their stage features)."""
    run = Run(simclr_run.path)
    images = images_of(run)
    return run, images, stage_features(run, images)


def test_a_resnet_run_has_a_row_per_stage_the_encoder_and_each_projector_layer(simclr_run):
    rows = stage_probes(simclr_run.path, protocols=["linear", "knn"], device="cpu")
    assert [r["stage"] for r in rows] == [*RESNET_STAGES, "encoder", "projector.1", "projector.out"]
    assert [r["dim"] for r in rows] == [8, 16, 32, 64, 64, 24, 12]
    assert all(0 <= r["linear_top1"] <= 100 and 0 <= r["knn_top1"] <= 100 for r in rows)
    stored = json.loads((simclr_run.path / "stages.json").read_text())
    assert stored["synthetic"] == rows


def test_the_encoder_row_is_exactly_the_features_evaluate_probes(simclr_features):
    run, images, features = simclr_features
    expected = extract(run.encoder, images, run.views.eval_transform, run.config.eval.batch_size)
    assert torch.equal(features["encoder"], expected)


def test_resnet_stage_rows_are_the_globally_pooled_outputs_of_forward_stages(simclr_features):
    run, images, features = simclr_features
    with torch.no_grad():
        maps = run.encoder.eval().forward_stages(run.views.eval_transform(images))
    for name, feature_map in zip(RESNET_STAGES, maps, strict=True):
        torch.testing.assert_close(features[name], feature_map.mean(dim=(2, 3)))
    assert torch.equal(features["layer4"], features["encoder"])  # the ResNet's own pool


def test_projector_rows_are_the_projector_applied_to_the_encoder_features(simclr_features):
    run, _, features = simclr_features
    projector = run.method.projector.eval()
    with torch.no_grad():
        hidden = projector[:3](features["encoder"])  # Linear, BatchNorm, ReLU
        output = projector(features["encoder"])
    torch.testing.assert_close(features["projector.1"], hidden)
    torch.testing.assert_close(features["projector.out"], output)


def test_a_supervised_run_has_its_stage_rows_and_no_projector_rows(supervised_run):
    rows = stage_probes(supervised_run.path, device="cpu")
    assert [r["stage"] for r in rows] == [*RESNET_STAGES, "encoder"]
    assert all(set(r) == {"stage", "dim", "linear_top1"} for r in rows)


def to_input(images):
    return images.float() / 255


def test_vit_rows_are_the_cls_token_after_each_stage_block_and_the_encoder_output():
    torch.manual_seed(0)
    vit = VisionTransformer(embed_dim=16, depth=8, num_heads=2, patch_size=4, image_size=16,
                            in_channels=1)  # fmt: skip
    model = StageFeatures(vit, projector=None)
    assert model.names == ["blocks.1", "blocks.3", "blocks.5", "blocks.7", "encoder"]
    # SimCLR with layers=0 has an identity head: no projector rows either
    assert StageFeatures(vit, projector=nn.Identity()).names == model.names
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    columns = extract(model, images, to_input)
    features = dict(zip(model.names, columns.split(model.widths, dim=1), strict=True))
    with torch.no_grad():
        cls_tokens = vit.eval().forward_stages(to_input(images))
        for name, cls in zip(model.stages, cls_tokens, strict=True):
            torch.testing.assert_close(features[name], cls)
        assert torch.equal(features["encoder"], vit(to_input(images)))
        torch.testing.assert_close(features["encoder"], vit.norm(features["blocks.7"]))


def test_transfer_probes_digits_resized_beside_the_runs_own_rows(simclr_run):
    pytest.importorskip("sklearn")
    own = stage_probes(simclr_run.path, device="cpu")
    rows = stage_probes(simclr_run.path, data="digits", device="cpu")  # 28x28, to the run's 16
    assert [r["stage"] for r in rows] == [r["stage"] for r in own]
    stored = json.loads((simclr_run.path / "stages.json").read_text())
    assert stored == {"synthetic": own, "digits": rows}


def test_transfer_to_images_with_other_channels_is_refused(simclr_run):
    with pytest.raises(ValueError, match="3-channel"):
        stage_probes(simclr_run.path, data={"name": "synthetic", "channels": 3}, device="cpu")


def test_stages_command_prints_every_stage_of_each_run_and_draws_a_png(
    simclr_run, supervised_run, tmp_path, capsys
):
    chart = tmp_path / "stages.png"
    runs = [str(simclr_run.path), str(supervised_run.path)]
    assert main(["stages", *runs, "--chart", str(chart), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    table = out.split("chart:")[0]
    lines = [line.split() for line in table.splitlines()[2:] if line]
    assert [line[0] for line in lines] == [
        *RESNET_STAGES,
        "encoder",
        "projector.1",
        "projector.out",
    ]
    assert table.splitlines()[1].split() == ["stage", "simclr", "supervised"]
    assert lines[-1][2] == "-"  # the supervised run has no projector
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stages_command_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["stages", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_stage_order_aligns_runs_on_the_encoder_and_keeps_each_runs_order():
    def rows(*stages):
        return [{"stage": s} for s in stages]

    results = {
        "resnet": rows(*RESNET_STAGES, "encoder", "projector.1", "projector.out"),
        "vit": rows(*VIT_STAGES, "encoder", "projector.1", "projector.2", "projector.out"),
    }
    order = stage_order(results)
    assert order[:8] == [s for pair in zip(RESNET_STAGES, VIT_STAGES, strict=True) for s in pair]
    assert order[8:] == ["encoder", "projector.1", "projector.2", "projector.out"]


def test_projector_blocks_cut_after_each_linear_with_its_norm_and_activation():
    blocks = mlp_blocks(mlp(4, 8, 2, layers=3))
    assert [[type(m).__name__ for m in b] for b in blocks] == [
        ["Linear", "BatchNorm1d", "ReLU"],
        ["Linear", "BatchNorm1d", "ReLU"],
        ["Linear"],
    ]
    assert len(mlp_blocks(nn.Linear(4, 2))) == 1
    with pytest.raises(ValueError, match="nn.Sequential"):
        mlp_blocks(nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))


def test_an_encoder_without_stages_is_refused_with_the_reason():
    class Patches(nn.Module):
        num_features = 4

    with pytest.raises(ValueError, match="without stages"):
        StageFeatures(PatchGridEncoder(Patches(), 4, 2), projector=None)


def test_only_knn_and_linear_are_stage_probes(simclr_run):
    with pytest.raises(ValueError, match="classify"):
        stage_probes(simclr_run.path, protocols=["classify"])
