"""The command line: errors name the problem and the fix; listings work."""

from selfsup.cli import main


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


def test_eval_of_a_folder_that_is_not_a_run_says_so(capsys, tmp_path):
    assert main(["eval", "knn", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
