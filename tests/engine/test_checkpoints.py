"""Checkpoints are verified on load: every damaged or foreign file gets one clear error naming it,
the previous good checkpoint stands in for a damaged last one, and a failed write leaves the old
one intact."""

import errno
import os
import shutil

import pytest
import torch
import yaml

import selfsup
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.files import (
    CheckpointError,
    load_checkpoint,
    previous_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


def _state(step):
    return {"method": {"w": torch.full((64, 64), float(step))}, "step": step}


class NotAllowed:
    """Weights-only unpickling refuses any class it does not know."""


@pytest.fixture
def two_saves(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(_state(1), path)
    save_checkpoint(_state(2), path)
    return path


def _flip_byte_in_the_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_last_two_checkpoints_are_kept(two_saves):
    assert read_checkpoint(two_saves)["step"] == 2
    assert read_checkpoint(previous_checkpoint(two_saves))["step"] == 1
    assert torch.equal(read_checkpoint(two_saves)["method"]["w"], torch.full((64, 64), 2.0))


def test_a_flipped_byte_is_caught_by_the_digest(two_saves):
    # torch's own reader loads such a file silently with wrong numbers
    _flip_byte_in_the_middle(two_saves)
    with pytest.raises(CheckpointError, match=f"{two_saves} is corrupted"):
        read_checkpoint(two_saves)


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(two_saves, caplog):
    _flip_byte_in_the_middle(two_saves)
    assert load_checkpoint(two_saves)["step"] == 1
    warning = caplog.text
    assert "corrupted" in warning and "using the previous checkpoint" in warning


def test_a_lost_last_checkpoint_falls_back_to_the_previous_one(two_saves, caplog):
    two_saves.unlink()  # killed between the two renames of a save
    assert load_checkpoint(two_saves)["step"] == 1
    assert "missing" in caplog.text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"\x93NUMPY not a checkpoint at all" * 10, "truncated or not a PyTorch file"),
        ("truncate", "truncated or not a PyTorch file"),
        (NotAllowed(), "weights-only loading refuses"),
        (torch.zeros(3), "holds a Tensor"),
        ({"conv1.weight": torch.zeros(2)}, "dict without 'method'"),  # `selfsup export` output
    ],
    ids=["zero-bytes", "random-bytes", "truncated", "code-pickle", "tensor", "exported-weights"],
)
def test_every_bad_checkpoint_gets_one_clear_error_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "last.pt"
    if content == "truncate":
        save_checkpoint(_state(1), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=expected) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_when_both_checkpoints_are_damaged_the_error_names_both(two_saves):
    _flip_byte_in_the_middle(two_saves)
    previous = previous_checkpoint(two_saves)
    previous.write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(two_saves)
    assert str(two_saves) in str(error.value) and str(previous) in str(error.value)


def test_a_full_disk_is_a_clear_error_and_the_old_checkpoint_stays(two_saves, monkeypatch):
    def disk_full(fd):  # where a full disk shows when the written data reaches it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is"):
        save_checkpoint(_state(3), two_saves)
    monkeypatch.undo()
    assert read_checkpoint(two_saves)["step"] == 2
    assert read_checkpoint(previous_checkpoint(two_saves))["step"] == 1
    assert sorted(p.name for p in two_saves.parent.iterdir()) == ["last.pt", "previous.pt"]


def test_the_cli_names_a_damaged_checkpoint_in_one_line(tiny_config, capsys):
    tiny_config["train"].update(epochs=1, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    previous_checkpoint(run.checkpoint_path).unlink(missing_ok=True)
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:1000])
    capsys.readouterr()
    for command in (["eval", "knn"], ["export"], ["train", "--resume"]):
        assert main([*command, str(run.path)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(run.checkpoint_path) in err
        assert err.count("\n") == 1, err


def test_a_checkpoint_of_another_run_is_named_not_a_traceback(tiny_config, tmp_path, capsys):
    tiny_config["train"].update(epochs=1, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    other = dict(tiny_config, method={"name": "byol", "hidden": 64, "dim": 32})
    other["train"] = dict(tiny_config["train"], name="other")
    other_run = selfsup.train(resolve(other))
    shutil.copy(other_run.checkpoint_path, run.checkpoint_path)
    previous_checkpoint(run.checkpoint_path).unlink(missing_ok=True)
    capsys.readouterr()
    for command in (["eval", "knn"], ["train", "--resume"]):
        assert main([*command, str(run.path)]) == 2
        err = capsys.readouterr().err
        assert "another" in err and str(run.checkpoint_path) in err and "Traceback" not in err


def test_training_resumes_from_the_previous_checkpoint_when_the_last_is_damaged(tiny_config):
    tiny_config["train"].update(epochs=2, knn_every=0)
    run = selfsup.train(resolve(tiny_config))
    steps = read_checkpoint(run.checkpoint_path)["step"]
    before = read_checkpoint(previous_checkpoint(run.checkpoint_path))["step"]
    assert before < steps
    _flip_byte_in_the_middle(run.checkpoint_path)
    resumed = selfsup.train(resume=run.path)
    assert read_checkpoint(resumed.checkpoint_path)["step"] == steps
    logged = [r["step"] for r in resumed.metrics if "loss" in r]
    assert logged == sorted(set(logged)), "the redone steps replace their log lines"
    assert yaml.safe_load((run.path / "config.yaml").read_text())["train"]["epochs"] == 2
