"""Two processes never share a folder: runs started together each claim their own, a run being
trained is locked against a second `train --resume`, and a study's --out against a second study.
A lock dies with its process, even by kill -9."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

import selfsup
import selfsup.run as run_module
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.files import LOCK_FILE, FolderInUseError, hold_folder, merge_json
from selfsup.run import Run
from selfsup.studies.runs import study_folder

STARTED_TOGETHER = 8


def _create(config, barrier, results):
    barrier.wait()  # every process passes this at the same moment, then creates its run
    try:
        results.put(str(Run.create(config, {"channels": 1}).path))
    except FileExistsError as error:
        results.put(f"refused: {error}")


def _start_together(config, monkeypatch):
    """What Run.create gave each of STARTED_TOGETHER forked processes released at once. As on a
    slow network file system, making a folder takes a while: every process is between looking
    at a name and writing into it at the same time."""
    make_folder = run_module.make_folder
    monkeypatch.setattr(
        run_module, "make_folder", lambda *args: (make_folder(*args), time.sleep(0.05))[0]
    )
    context = multiprocessing.get_context("fork")  # no re-import of torch: seconds, not minutes
    barrier, results = context.Barrier(STARTED_TOGETHER), context.Queue()
    processes = [
        context.Process(target=_create, args=(config, barrier, results))
        for _ in range(STARTED_TOGETHER)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    return outcomes


def test_runs_started_in_the_same_second_each_claim_their_own_folder(tiny_config, monkeypatch):
    tiny_config["train"]["name"] = None  # the automatic name: method-data-time
    monkeypatch.setattr(time, "strftime", lambda *args: "20261201-053102")  # one second for all
    paths = _start_together(resolve(tiny_config), monkeypatch)
    base = f"{tiny_config['train']['out_dir']}/simclr-synthetic-20261201-053102"
    assert sorted(paths) == sorted([base] + [f"{base}-{n}" for n in range(2, 9)])
    for path in paths:
        run = Run(path)
        assert run.config.method["name"] == "simclr" and run.info == {"channels": 1}
    leftovers = [p for path in paths for p in os.listdir(path) if p.endswith(".tmp")]
    assert not leftovers


def test_runs_started_together_with_one_train_name_leave_one_run_and_clear_errors(
    tiny_config, monkeypatch
):
    outcomes = _start_together(resolve(tiny_config), monkeypatch)
    path = f"{tiny_config['train']['out_dir']}/tiny"
    assert outcomes.count(path) == 1
    refused = [o for o in outcomes if o != path]
    assert len(refused) == STARTED_TOGETHER - 1
    assert all(f"run folder {path} exists; continue it with `selfsup train --resume" in r
               for r in refused)  # fmt: skip
    assert Run(path).info == {"channels": 1}


HOLDER = textwrap.dedent("""
    import sys, time
    from selfsup.files import hold_folder
    with hold_folder(sys.argv[1]):
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(folder, seconds=60.0):
    """Another process that holds `folder` (for `seconds`), once it says so."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "holding\n"
    return process


def test_a_folder_held_by_a_live_process_is_refused_naming_that_process(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUseError) as refused, hold_folder(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert f"run folder {tmp_path} is in use by process {holder.pid} on " in str(refused.value)
    assert str(refused.value).endswith("; wait for it to finish or stop it")
    assert isinstance(refused.value, ValueError)  # the CLI prints it as one line


def test_the_lock_of_a_process_killed_with_sigkill_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert f"process {holder.pid} " in (tmp_path / LOCK_FILE).read_text()  # left behind
    with hold_folder(tmp_path):
        assert f"process {os.getpid()} " in (tmp_path / LOCK_FILE).read_text()


def test_the_lock_is_released_at_the_end_of_the_block_and_of_the_process(tmp_path):
    with hold_folder(tmp_path), pytest.raises(FolderInUseError), hold_folder(tmp_path):
        pass  # flock: a second open file of one process is a second holder, and refused
    with hold_folder(tmp_path):
        pass
    _holder(tmp_path, seconds=0).wait()  # ends normally
    with hold_folder(tmp_path):
        pass


def test_a_run_is_locked_while_it_trains_and_a_second_resume_is_refused(
    tiny_config, tmp_path, monkeypatch, capsys
):
    tiny_config["train"].update(epochs=1, max_steps=1, knn_every=0, collapse_guard=False)
    train_module = sys.modules["selfsup.engine.train"]
    refusals = []

    def plot_while_training(metrics, path, title):  # rank 0's last act before train() returns
        try:
            with hold_folder(path.parent):
                pass
        except FolderInUseError as error:
            refusals.append(str(error))

    monkeypatch.setattr(train_module, "plot_curves", plot_while_training)
    run = selfsup.train(resolve(tiny_config))  # a new run: held from its creation
    assert selfsup.train(resume=run.path).path == run.path  # resumed (at its last step)
    assert len(refusals) == 2 and all(f"process {os.getpid()} " in r for r in refusals)
    holder = _holder(run.path)
    capsys.readouterr()  # what the two runs above logged
    try:
        assert main(["train", "--resume", str(run.path), "train.max_steps=null"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"selfsup: error: run folder {run.path} is in use by process {holder.pid} " in err
    assert max(r["step"] for r in run.metrics if "loss" in r) == 1  # it trained no step


@pytest.mark.parametrize(
    "command",
    [
        ["compare", "{recipe}", "--minutes", "0.05"],
        ["gap", "{recipe}", "--pre-classes", "0,1", "--supervised", "supervised/fashion_mnist"],
        ["momentum", "{recipe}"],
    ],
    ids=["compare", "gap", "momentum"],
)
def test_a_second_study_pointed_at_one_out_folder_stops_naming_the_first(
    tiny_config, tmp_path, capsys, command
):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "study"
    argv = [part.format(recipe=recipe) for part in command] + ["--out", str(out)]
    with study_folder(out):  # the first study, still running
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--out folder {out} is in use by process {os.getpid()} " in err
    assert err.strip().endswith("wait for it to finish or stop it, or choose another --out")
    assert os.listdir(out) == [LOCK_FILE]  # nothing trained


def _add_results(path, worker, barrier):
    def update(stored):
        time.sleep(0.002)  # between reading and writing: where a second process would step in
        stored[f"{worker}-{len([k for k in stored if k.startswith(f'{worker}-')])}"] = worker

    barrier.wait()
    for _ in range(20):
        merge_json(path, update)


def test_processes_adding_results_to_one_file_at_once_all_keep_theirs(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"knn_top1": 80.0}))
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    processes = [context.Process(target=_add_results, args=(path, w, barrier)) for w in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    stored = json.loads(path.read_text())
    assert len(stored) == 1 + 4 * 20 and stored["knn_top1"] == 80.0
    assert sorted(os.listdir(tmp_path)) == [".eval.json.lock", "eval.json"]  # no temporary left
