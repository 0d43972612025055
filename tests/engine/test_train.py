"""The training engine: exact resume, run folder, checkpoints, export and embedding."""

import json
import os
import signal
import time

import numpy as np
import pytest
import torch

import selfsup
from selfsup.config import resolve
from selfsup.files import CheckpointError, save_atomic


def _state(run):
    return run.checkpoint()


def test_resume_gives_the_same_weights_as_training_straight(tiny_config, tmp_path):
    tiny_config["train"].update(epochs=1, log_every=1)
    straight = selfsup.train(resolve(tiny_config))
    total = _state(straight)["step"]
    tiny_config["train"].update(name="halves", max_steps=total // 2)
    first_half = selfsup.train(resolve(tiny_config))
    assert _state(first_half)["step"] == total // 2
    resumed = selfsup.train(resume=first_half.path, overrides=["train.max_steps=null"])
    a, b = _state(straight), _state(resumed)
    assert a["step"] == b["step"] == total == 10
    for key, value in a["method"].items():
        assert torch.allclose(value.float(), b["method"][key].float(), atol=1e-6), key
    assert a["batches"] == b["batches"]
    assert torch.equal(a["rng"]["augment"], b["rng"]["augment"])
    losses = lambda run: [r["loss"] for r in run.metrics if "loss" in r]  # noqa: E731
    assert np.allclose(losses(straight), losses(resumed), atol=1e-5)


def test_a_run_folder_holds_config_metrics_checkpoint_and_curves(tiny_config):
    run = selfsup.train(resolve(tiny_config))
    for name in ("config.yaml", "data.json", "metrics.jsonl", "checkpoints/last.pt", "curves.png"):
        assert (run.path / name).is_file(), name
    knn = [r for r in run.metrics if "knn_top1" in r]
    assert len(knn) == 2, "the kNN monitor runs once per epoch"
    loaded = selfsup.load(run.path)
    assert loaded.config == run.config
    with pytest.raises(FileExistsError, match="--resume"):
        selfsup.train(resolve(tiny_config))


def test_training_lowers_the_loss_and_learns_features_above_chance(tiny_config):
    tiny_config["train"].update(epochs=6)
    run = selfsup.train(resolve(tiny_config))
    losses = [r["loss"] for r in run.metrics if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    results = selfsup.evaluate(run)
    assert results["knn_top1"] > 30 and results["linear_top1"] > 30  # 10 classes: chance is 10 %
    assert json.loads((run.path / "eval.json").read_text())["knn_top1"] == results["knn_top1"]


def test_export_writes_backbone_weights_with_torchvision_names(tiny_config, tmp_path):
    tiny_config["train"].update(epochs=1, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    path = selfsup.export(run.path, tmp_path / "weights.pt")
    state = torch.load(path, weights_only=True)
    assert "conv1.weight" in state and "layer4.1.bn2.running_var" in state
    backbone = selfsup.BACKBONES.build(
        {"name": "resnet18", "stem": "small", "width": 0.125}, in_channels=1
    )
    backbone.load_state_dict(state)  # strict: exactly the backbone's keys


def test_embed_writes_one_feature_row_per_image(tiny_config, tmp_path):
    tiny_config["train"].update(epochs=1, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    out = tmp_path / "feats.npy"
    features = selfsup.embed(run.path, "synthetic:test", out)
    assert np.load(out).shape == features.shape
    assert features.shape[1] == run.encoder.num_features and features.dtype == np.float32


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="disk full"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path], "no temporary file is left behind"


def _signal_in_forward(monkeypatch, signals, at_call=4):
    """SimCLR whose `at_call`-th forward sends this process `signals`: a Ctrl-C or a scheduler's
    SIGTERM in the middle of a step (after its batch and views were drawn)."""
    from selfsup.methods.simclr import SimCLR

    calls = {"n": 0}
    original = SimCLR.forward

    def forward(self, views, progress):
        calls["n"] += 1
        if calls["n"] == at_call:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return original(self, views, progress)

    monkeypatch.setattr(SimCLR, "forward", forward)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])  # Ctrl-C, a scheduler's kill
def test_a_run_interrupted_mid_step_saves_that_step_and_resumes_to_the_uninterrupted_result(
    tiny_config, monkeypatch, name
):
    tiny_config["train"].update(epochs=1, knn_every=0, collapse_guard=False, name="straight")
    straight = selfsup.train(resolve(tiny_config))
    _signal_in_forward(monkeypatch, [getattr(signal, name)])
    tiny_config["train"]["name"] = "interrupted"
    with pytest.raises(KeyboardInterrupt):
        selfsup.train(resolve(tiny_config))
    monkeypatch.undo()
    run = selfsup.load(tiny_config["train"]["out_dir"] + "/interrupted")
    assert run.checkpoint()["step"] == 4, "the step under way is finished, then saved"
    resumed = selfsup.train(resume=run.path)
    a, b = _state(straight), _state(resumed)
    assert a["step"] == b["step"] == 10
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    assert a["batches"] == b["batches"]
    losses = lambda run: [r["loss"] for r in run.metrics if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(straight)


def test_a_second_interrupt_stops_at_once_without_saving_the_half_made_step(
    tiny_config, monkeypatch
):
    tiny_config["train"].update(epochs=1, knn_every=0, collapse_guard=False)
    # Python's default_int_handler, or SIG_IGN where the tests run in a background job
    before = signal.getsignal(signal.SIGINT)
    _signal_in_forward(monkeypatch, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        selfsup.train(resolve(tiny_config))
    run = selfsup.load(tiny_config["train"]["out_dir"] + "/tiny")
    assert not run.has_checkpoint  # the first checkpoint would have come at the epoch's end
    assert signal.getsignal(signal.SIGINT) is before  # given back


def test_a_resumed_run_says_where_it_goes_on(tiny_config, caplog):
    tiny_config["train"].update(epochs=1, max_steps=4)
    run = selfsup.train(resolve(tiny_config))  # 10 steps an epoch, stopped at 4
    saved_at = run.checkpoint()["saved_at"]
    with caplog.at_level("INFO", logger="selfsup.engine.train"):
        selfsup.train(resume=run.path, overrides=["train.max_steps=null"])
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved_at))
    assert f"resumed from step 4 of 10 (epoch 0.40), checkpoint of {when}" in caplog.text


def test_a_run_resumed_without_a_checkpoint_says_so_and_trains_from_step_0(tiny_config, caplog):
    tiny_config["train"].update(epochs=1, log_every=1)
    run = selfsup.train(resolve(tiny_config))
    (run.path / "checkpoints" / "last.pt").unlink()  # as if it stopped before its first save
    with caplog.at_level("WARNING", logger="selfsup.engine.train"):
        resumed = selfsup.train(resume=run.path)
    assert f"{run.path} has no checkpoint yet: training it from step 0" in caplog.text
    steps = [r["step"] for r in resumed.metrics if "loss" in r]
    assert steps == list(range(1, 11))  # the first attempt's lines are not kept twice
    assert resumed.checkpoint()["step"] == 10


@pytest.mark.slow
def test_a_compiled_backbone_trains_and_saves_the_plain_parameter_names(tiny_config):
    # torch.compile wraps the forward only, so checkpoints load into an uncompiled model (~35 s).
    tiny_config["train"].update(epochs=1, knn_every=0, compile=True)
    run = selfsup.train(resolve(tiny_config))
    assert all(np.isfinite(r["loss"]) for r in run.metrics if "loss" in r)
    assert not any("_orig_mod" in key for key in run.checkpoint()["method"])
    assert selfsup.load(run.path).encoder.num_features == 64


def test_no_warning_from_our_code_on_the_main_path(tiny_config, recwarn):
    tiny_config["train"].update(epochs=1, progress=True)
    run = selfsup.train(resolve(tiny_config))
    selfsup.evaluate(run)
    ours = [w for w in recwarn if "selfsup" in str(w.filename) or "requires_grad" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]


def test_an_evaluated_run_resumed_for_more_steps_still_draws_its_curves(tiny_config):
    # evaluation lines carry knn_top1 without an epoch: the chart must skip them
    tiny_config["train"].update(max_steps=2, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    selfsup.evaluate(run, ["knn"])
    resumed = selfsup.train(resume=run.path, overrides=["train.max_steps=4"])
    assert resumed.checkpoint()["step"] == 4 and (resumed.path / "curves.png").is_file()
