"""The command line: errors name the problem and the fix; listings work."""

import os
import subprocess
import sys
from pathlib import Path

import selfsup
from selfsup.cli import main
from selfsup.config import resolve

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_override_key_lists_the_valid_keys(capsys, tmp_path):
    code = main(
        ["train", "simclr/fashion_mnist", "optim.learning_rate=0.1", f"train.out_dir={tmp_path}"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key 'optim.learning_rate'" in err and "did you mean 'lr'" in err
    assert "valid:" in err and "weight_decay" in err
    assert not any(tmp_path.iterdir()), "a run folder was created for an invalid config"


def test_recipes_and_methods_are_listed(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "simclr/fashion_mnist" in out
    assert main(["methods"]) == 0
    assert "simclr" in capsys.readouterr().out


def _selfsup(*args: str, stdout) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "selfsup", *args], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE
    )


def test_a_listing_into_a_pipe_closed_early_ends_quietly():
    # `selfsup recipes | head -1`: the reader takes one line and goes away
    listing = _selfsup("recipes", stdout=subprocess.PIPE)
    assert listing.stdout.readline()
    listing.stdout.close()
    err = listing.communicate(timeout=120)[1].decode()
    assert "Traceback" not in err and "Error" not in err, err
    assert listing.returncode in (0, 141)  # 0 when every line was in the pipe before it closed
    # a reader gone before the first write: always a broken pipe, as SIGPIPE would end `cat`
    read_end, write_end = os.pipe()
    os.close(read_end)
    listing = _selfsup("recipes", stdout=write_end)
    os.close(write_end)
    err = listing.communicate(timeout=120)[1].decode()
    assert err == "" and listing.returncode == 141


def test_eval_of_a_folder_that_is_not_a_run_says_so(capsys, tmp_path):
    assert main(["eval", "knn", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_train_resume_eval_embed_export_from_the_command_line(tiny_config, tmp_path, capsys):
    import yaml

    tiny_config["train"].update(epochs=1, knn_every=0, max_steps=3)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(recipe)]) == 0
    run_dir = tiny_config["train"]["out_dir"] + "/tiny"
    assert main(["train", "--resume", run_dir, "train.max_steps=null"]) == 0
    assert main(["eval", "knn", run_dir]) == 0
    assert "knn_top1" in capsys.readouterr().out
    assert main(["eval", "linear", run_dir]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert float(printed["linear_weight_decay"]) in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # not "0.00"
    assert main(["embed", run_dir, "synthetic:test", "-o", str(tmp_path / "f.npy")]) == 0
    assert (tmp_path / "f.npy").is_file()
    assert main(["export", run_dir, "-o", str(tmp_path / "w.pt")]) == 0
    assert (tmp_path / "w.pt").is_file()


def test_demo_fills_its_time_budget_and_says_how_to_replay_it(tiny_config, tmp_path, capsys):
    import yaml

    tiny_config["train"]["knn_every"] = 0
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    assert main(["demo", "--recipe", str(recipe), "--minutes", "3.05"]) == 0  # 3 s to pre-train
    out = capsys.readouterr().out
    assert "chosen to fill 0.05 minutes; replay: train.epochs=" in out
    assert "raw pixels" in out and "simclr" in out
    assert main(["demo", "--recipe", str(recipe), "--minutes", "2"]) == 2
    assert "leaves no time to pre-train" in capsys.readouterr().err


def test_an_output_option_given_a_folder_writes_the_default_name_inside_it(
    tiny_config, tmp_path, capsys, monkeypatch
):
    tiny_config["train"].update(epochs=1, max_steps=1, knn_every=0, collapse_guard=False)
    tiny_config["eval"].update(linear_epochs=2, linear_weight_decay=1e-4)
    run = str(selfsup.train(resolve(tiny_config)).path)
    small = ["--map-images", "40", "--bank-images", "40", "--queries", "2", "--neighbours", "2"]
    commands = {
        "features.npy": ["embed", run, "synthetic:test", "-o"],
        "encoder.pt": ["export", run, "-o"],
        "report.html": ["report", run, *small, "-o"],
        "stages.png": ["stages", run, "--chart"],
    }
    for name, command in commands.items():
        out = tmp_path / f"{command[0]}-out"
        out.mkdir()
        assert main([*command, str(out)]) == 0, name
        assert f"{out / name}" in capsys.readouterr().out  # it says where it wrote
        assert os.listdir(out) == [name]  # that file, and no dot-file
    fresh = tmp_path / "new"  # a folder to make, named with a trailing slash
    assert main(["export", run, "-o", f"{fresh}/"]) == 0
    assert os.listdir(fresh) == ["encoder.pt"]
    monkeypatch.chdir(tmp_path / "embed-out")  # `-o .`, the case that wrote a hidden `..npy`
    (tmp_path / "embed-out" / "features.npy").unlink()
    assert main(["embed", run, "synthetic:test", "-o", "."]) == 0
    assert "wrote features.npy: " in capsys.readouterr().out
    assert os.listdir(".") == ["features.npy"]
    os.replace("features.npy", "taken")
    os.mkdir("features.npy")  # the default name is a folder: one line, nothing written
    assert main(["embed", run, "synthetic:test", "-o", "."]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--output: features.npy is a folder, not a file" in err


def test_eval_takes_eval_overrides_for_this_evaluation_only(tiny_config, capsys):
    import torch

    from selfsup.eval.protocols import _splits
    from selfsup.probes.features import extract

    tiny_config["train"].update(epochs=1, knn_every=0, max_steps=3)
    run = selfsup.train(resolve(tiny_config))
    assert main(["eval", "knn", str(run.path), "eval.knn_k=1"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    # k = 1: each test image takes the label of its most cosine-similar training image
    train, test = _splits(run.config)
    features = [extract(run.encoder, d.images, run.views.eval_transform) for d in (train, test)]
    unit = [torch.nn.functional.normalize(f, dim=1) for f in features]
    nearest = train.labels[(unit[1] @ unit[0].T).argmax(1)]
    expected = 100 * (nearest == test.labels).float().mean().item()
    assert abs(float(printed["knn_top1"]) - expected) < 0.01
    assert run.config.eval.knn_k == 20  # the run's own setting is unchanged
    assert run.metrics[-1]["overrides"] == ["eval.knn_k=1"]
    assert main(["eval", "knn", str(run.path), "optim.lr=1"]) == 2
    assert "eval.* overrides only" in capsys.readouterr().err
