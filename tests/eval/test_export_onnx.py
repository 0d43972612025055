"""`selfsup export --format onnx`: the run's encoder with its normalisation as an ONNX model whose
features, computed by onnxruntime, are those `embed` computes in PyTorch, at any batch size."""

from __future__ import annotations

import contextlib
import importlib.util
import io

import numpy as np
import pytest
import torch
from torch import nn

import selfsup
from selfsup.build import load_data
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.probes.features import extract

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BACKBONES = {
    "resnet": {"name": "resnet18", "stem": "small", "width": 0.125},
    "vit": {"name": "vit_tiny", "patch_size": 8},
}


def tiny_config(backbone: str, out_dir: str) -> dict:
    """Two SimCLR steps on 16-px one-channel synthetic images: trained BN statistics and
    normalisation by the data's mean and std, which the exported graph must carry."""
    return {
        "method": {"name": "simclr", "hidden": 64, "dim": 32},
        "backbone": BACKBONES[backbone],
        "data": {"name": "synthetic", "per_class": 4, "size": 16},
        "views": {"name": "simclr", "size": 16, "blur_p": 0.0},
        "optim": {"name": "sgd", "lr": 0.3, "batch_size": 16, "warmup_epochs": 0},
        "train": {"epochs": 1, "max_steps": 2, "knn_every": 0, "collapse_guard": False,
                  "out_dir": out_dir, "name": backbone, "progress": False},
    }  # fmt: skip


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def exported(request, tmp_path_factory):
    """(run, path of its ONNX model, the line the command printed), exported by the command line
    into a folder given with -o."""
    out = tmp_path_factory.mktemp("out")
    run = selfsup.train(resolve(tiny_config(request.param, str(out / "runs"))))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(run.path), "--format", "onnx", "-o", f"{out}/"]) == 0
    return run, out / "encoder.onnx", printed.getvalue()


def test_onnx_features_equal_the_pytorch_encoders_at_batch_sizes_1_and_5(exported):
    run, path, _ = exported
    images = load_data(run.config, "test").images[:5]  # uint8 (5, 1, 16, 16)
    expected = extract(run.encoder, images, run.views.eval_transform).numpy()  # what embed writes
    assert expected.std() > 0.1  # features with a scale, so that 1e-4 is a real test
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for count in (1, 5):
        # the documented input: pixels / 255; the graph normalises as the run does
        pixels = images[:count].numpy().astype(np.float32) / 255
        (features,) = session.run(["features"], {"images": pixels})
        assert features.shape == (count, expected.shape[1])
        assert np.abs(features - expected[:count]).max() < 1e-4  # max abs difference


def test_onnx_model_has_the_documented_input_and_output(exported):
    run, path, printed = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    features = run.encoder.num_features
    assert (given.name, given.type, given.shape) == (
        "images",
        "tensor(float)",
        ["batch", 1, 16, 16],
    )
    assert (returned.name, returned.type, returned.shape) == (
        "features",
        "tensor(float)",
        ["batch", features],
    )
    contract = (
        "input 'images' float32 (N, 1, 16, 16), grey pixels / 255 in [0, 1] (normalisation "
        f"inside the model); output 'features' float32 (N, {features})"
    )
    assert printed == f"wrote {path}: {contract}\n"
    metadata = session.get_modelmeta()
    assert contract in metadata.description
    assert metadata.custom_metadata_map["method"] == "simclr"


def test_onnx_export_defaults_to_encoder_onnx_in_the_run_folder_and_state_dict_stays_default(
    exported, capsys
):
    run, _, _ = exported
    assert selfsup.export(run.path, format="onnx") == run.path / "encoder.onnx"
    assert (run.path / "encoder.onnx").stat().st_size > 0
    assert main(["export", str(run.path)]) == 0
    assert capsys.readouterr().out == f"wrote {run.path / 'encoder.pt'}\n"
    state = torch.load(run.path / "encoder.pt", weights_only=True)
    assert state.keys() == run.encoder.state_dict().keys()


def test_onnx_export_without_its_libraries_names_the_extra(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a),
    )
    command = ["export", str(tmp_path), "--format", "onnx", "-o", str(tmp_path / "e.onnx")]
    assert main(command) == 2
    assert capsys.readouterr().err == (
        "selfsup: error: exporting to ONNX needs onnxscript, which is not installed: "
        'pip install "selfsup[onnx]"\n'
    )
    assert not (tmp_path / "e.onnx").exists()


class DataDependent(nn.Module):
    """An encoder whose branch depends on the pixels: a graph of fixed operations cannot hold it."""

    num_features = 256

    def forward(self, x):
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


def test_an_encoder_onnx_cannot_express_is_refused_in_one_line(exported, capsys, monkeypatch):
    from selfsup.methods.simclr import SimCLR

    run, _, _ = exported
    monkeypatch.setattr(SimCLR, "encoder", property(lambda self: DataDependent()))
    assert main(["export", str(run.path), "--format", "onnx", "-o", str(run.path / "x.onnx")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1  # the exporter's dumps kept out
    assert captured.err.startswith(f"selfsup: error: the encoder of {run.path} (simclr with ")
    assert "cannot be exported to ONNX (GuardOnDataDependentSymNode: " in captured.err
    assert captured.err.endswith("; export its weights with --format state_dict\n")
    assert not (run.path / "x.onnx").exists()
