"""Bad input through the real command line, as a new user would give it: every case runs
`python -m selfsup ...` in a subprocess (a time and memory limit catch a runaway process) and is
classified by what the user sees. Writes the table of docs/hostile_input.md.

    python scripts/hostile_inputs.py                  # prints the markdown table
    python scripts/hostile_inputs.py -o docs/hostile_input.md
    python scripts/hostile_inputs.py --only "output folder"   # one group of cases

Outcomes: "clear error" (exit 2, one line naming the problem, no traceback), "accepted" (exit 0;
the expected outcome where the input is valid, e.g. mixed image modes), "skipped and counted"
(exit 0 with a warning that counts unreadable images), and the failures this exists to find:
"traceback", "wrongly accepted", "runaway" (killed at the time or memory limit).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TIMEOUT_S = 120
MEMORY_BYTES = 6 * 2**30
# Holds a folder's lock (files.hold_folder) until its stdin closes: when this script ends.
HOLDER = (
    "import sys\nfrom selfsup.files import hold_folder\nwith hold_folder(sys.argv[1]):\n"
    "    print('held', flush=True)\n    sys.stdin.read()"
)
HOLDERS: list[subprocess.Popen] = []  # the live holders, kept so that their stdin stays open
TINY = [
    "views.size=16", "backbone.width=0.125", "optim.batch_size=16", "train.max_steps=2",
    "train.progress=false",
    "train.knn_every=0", "eval.monitor_train=40", "eval.monitor_test=20",
    "eval.linear_epochs=5", "method.hidden=32", "method.dim=16",
]  # fmt: skip


@dataclass
class Case:
    group: str
    what: str
    args: list[str]
    expect: str  # "error", "accept" or "skip"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))


def run_case(case: Case, cwd: Path) -> tuple[str, str]:
    """(outcome, what the user saw: the last stderr line)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "selfsup", *case.args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            preexec_fn=_limit_memory,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    except subprocess.TimeoutExpired:
        return "runaway", f"still running after {TIMEOUT_S} s"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    said = [line for line in done.stdout.strip().splitlines() if line.strip()]
    shown = lines[-1] if lines else (said[-1] if said else "")
    if "Traceback" in done.stderr or done.returncode not in (0, 2):
        return ("runaway" if "MemoryError" in done.stderr else "traceback"), shown
    if done.returncode == 2:
        return "clear error", shown
    if case.expect == "skip" and "skipped" in done.stderr:
        return "skipped and counted", next(line for line in lines if "skipped" in line)
    return ("accepted" if case.expect != "error" else "wrongly accepted"), shown


def _checkpoints(root: Path, run: Path, other: Path) -> dict[str, Path]:
    """Bad checkpoint files, each in a copy of `run` whose last.pt it replaces."""
    good = run / "checkpoints" / "last.pt"
    data = good.read_bytes()
    torch.save({"conv1.weight": torch.zeros(2)}, root / "exported.pt")
    torch.save(torch.zeros(3), root / "tensor.pt")
    torch.save({"method": {}, "step": 0, "x": argparse.Namespace()}, root / "pickle.pt")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    contents = {
        "a zero-byte file": b"",
        "a truncated file": data[: len(data) // 2],
        "random bytes": np.random.default_rng(0).bytes(4096),
        "a flipped byte (no previous checkpoint)": bytes(flipped),
        "a pickle that weights-only loading refuses": (root / "pickle.pt").read_bytes(),
        "weights from `selfsup export`": (root / "exported.pt").read_bytes(),
        "a plain tensor": (root / "tensor.pt").read_bytes(),
        "the checkpoint of another method's run": (other / "checkpoints/last.pt").read_bytes(),
    }
    runs = {}
    for i, (what, content) in enumerate(contents.items()):
        copy = root / f"bad-ckpt-{i}"
        shutil.copytree(run, copy)
        (copy / "checkpoints" / "previous.pt").unlink(missing_ok=True)
        (copy / "checkpoints" / "last.pt").write_bytes(content)
        runs[what] = copy
    return runs


def _hold(folder: Path) -> subprocess.Popen:
    """Another process that holds the lock of `folder`, once it says so."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    holder.stdout.readline()
    return holder


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image_folders(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)

    def folder(name: str) -> Path:
        path = root / name
        for cls in ("a", "b"):
            for i in range(12):
                _png(path / cls / f"{i}.png", rng.integers(0, 255, (16, 16), np.uint8))
        return path

    corrupt, empty_png, text_png = folder("corrupt"), folder("empty_png"), folder("text_png")
    data = (corrupt / "a" / "0.png").read_bytes()
    (corrupt / "a" / "truncated.png").write_bytes(data[: len(data) // 2])
    (empty_png / "b" / "zero.png").write_bytes(b"")
    (text_png / "b" / "notes.png").write_text("this is text")
    only_bad = root / "only_bad" / "a"
    only_bad.mkdir(parents=True)
    (only_bad / "x.png").write_bytes(b"")
    (root / "empty").mkdir()
    mixed = folder("mixed_modes")
    _png(mixed / "a" / "rgb.png", rng.integers(0, 255, (16, 16, 3), np.uint8))
    _png(mixed / "b" / "rgba.png", rng.integers(0, 255, (16, 16, 4), np.uint8))
    sizes = folder("mixed_sizes")
    _png(sizes / "a" / "big.png", rng.integers(0, 255, (24, 20), np.uint8))
    one = root / "one_class"
    for i in range(20):
        _png(one / "only" / f"{i}.png", rng.integers(0, 255, (16, 16), np.uint8))
    return {
        "a truncated image among good ones": corrupt,
        "a zero-byte .png among good ones": empty_png,
        "a text file named .png among good ones": text_png,
        "only unreadable images": root / "only_bad",
        "no images at all": root / "empty",
        "RGB, RGBA and grayscale images mixed": mixed,
        "images of different sizes (no data.size)": sizes,
        "one class only": one,
        "a path that does not exist": root / "nowhere",
    }


def _npz(root: Path) -> dict[str, Path]:
    images = np.zeros((40, 16, 16), np.uint8)
    arrays = {
        "images of shape (N, 5)": {"images": np.zeros((10, 5), np.uint8)},
        "40 images, 30 labels": {"images": images, "labels": np.zeros(30, int)},
        "a negative label": {"images": images, "labels": np.r_[np.arange(39) % 4, -3]},
        "fractional labels": {"images": images, "labels": np.linspace(0, 1, 40)},
        "pixels of -5..300": {"images": np.linspace(-5, 300, 40 * 256).reshape(40, 16, 16)},
        "no images array": {"pixels": images},
    }
    paths = {}
    for i, (what, content) in enumerate(arrays.items()):
        paths[what] = root / f"bad{i}.npz"
        np.savez(paths[what], **content)
    return paths


def cases(root: Path) -> list[Case]:
    out = str(root / "runs")
    train = ["train", "simclr/fashion_mnist", *TINY, f"train.out_dir={out}"]
    synthetic = ["data.name=synthetic", "data.per_class=8", "data.size=16"]
    subprocess.run(
        [sys.executable, "-m", "selfsup", *train, *synthetic, "train.name=good",
         "train.max_steps=4"],
        check=True, capture_output=True, cwd=root,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "selfsup", "train", "byol/fashion_mnist", *TINY, *synthetic,
         f"train.out_dir={out}", "train.name=other"],
        check=True, capture_output=True, cwd=root,
    )  # fmt: skip
    good = root / "runs" / "good"
    found: list[Case] = []
    for what, run in _checkpoints(root, good, root / "runs" / "other").items():
        for command in (["train", "--resume"], ["eval", "knn"], ["export"]):
            found.append(Case("checkpoint", f"{what}: {' '.join(command)}", [*command, str(run)],
                              "error"))  # fmt: skip
        found.append(Case("checkpoint", f"{what}: embed",
                          ["embed", str(run), "synthetic:test", "-o", str(root / "f.npy")],
                          "error"))  # fmt: skip
    recipes = {
        "a YAML syntax error": "method: {name: simclr\noptim: [\n",
        "a !!python/object tag": "method: !!python/object/apply:os.system ['true']\n",
        "a list, not a mapping": "- method\n- optim\n",
        "batch size -32": "method: {name: simclr}\nbackbone: {name: resnet18}\n"
        "data: {name: fashion_mnist}\nviews: {name: simclr}\noptim: {batch_size: -32}\n",
    }
    for i, (what, text) in enumerate(recipes.items()):
        path = root / f"recipe{i}.yaml"
        path.write_text(text)
        found.append(Case("recipe", what, ["train", str(path)], "error"))
    overrides = {
        "optim.batch_size=0": "error", "optim.batch_size=-4": "error",
        "optim.batch_size=2.5": "error", "method.temperature=0": "error",
        "method.temperature=-0.5": "error", "train.epochs=-3": "error",
        "train.epochs=abc": "error", "optim.lr=-1": "error", "backbone.width=0": "error",
        "views.blur_p=2": "error", "method.name=0": "error", "method.name=simclrr": "error",
        "optim.learning_rate=0.1": "error", "nonsense.key=1": "error",
        "train.name=[unclosed": "error", "data.per_class=1": "error",
    }  # fmt: skip
    for override, expect in overrides.items():
        found.append(Case("override", override, [*train, *synthetic, override], expect))
    for what, path in _npz(root).items():
        found.append(Case("npz", what, [*train, "data.name=npz", f"data.root={path}"], "error"))
    for what, path in _image_folders(root).items():
        expect = {"RGB, RGBA and grayscale images mixed": "accept", "one class only": "accept"}
        expect = expect.get(what, "skip" if "among good" in what else "error")
        folder = [*train, "data.name=image_folder", f"data.root={path}"]
        found.append(Case("image folder", f"train on {what}", folder, expect))
        embed = ["embed", str(good), str(path), "-o", str(root / "e.npy")]
        resized = what == "images of different sizes (no data.size)"  # to the run's size
        found.append(Case("image folder", f"embed {what}", embed, "accept" if resized else expect))
    not_run = root / "not_a_run"
    not_run.mkdir()
    broken = root / "broken_config"
    shutil.copytree(good, broken)
    (broken / "config.yaml").write_text("method: {name: simclr\n")
    no_info = root / "no_data_json"
    shutil.copytree(good, no_info)
    (no_info / "data.json").unlink()
    for what, path in {"a folder that is not a run": not_run,
                       "a run whose config.yaml is broken": broken,
                       "a run without data.json": no_info}.items():  # fmt: skip
        for command in (["eval", "knn"], ["train", "--resume"]):
            found.append(Case("run folder", f"{what}: {' '.join(command)}", [*command, str(path)],
                              "error"))  # fmt: skip
    busy, killed = root / "busy_run", root / "killed_run"
    shutil.copytree(good, busy)
    shutil.copytree(good, killed)
    HOLDERS.append(_hold(busy))
    stale = _hold(killed)
    stale.kill()  # SIGKILL: its .lock stays behind, unlocked
    stale.wait()
    found.append(Case("run folder", "train --resume while another process trains it",
                      ["train", "--resume", str(busy)], "error"))  # fmt: skip
    found.append(Case("run folder", "train --resume after its trainer was killed with kill -9",
                      ["train", "--resume", str(killed)], "accept"))  # fmt: skip
    blocker = root / "results.txt"
    blocker.write_text("a file where an output folder should go")
    for what, args in {
        "train: train.out_dir is a file": [*train, f"train.out_dir={blocker}"],
        "train: train.out_dir lies inside a file": [*train, f"train.out_dir={blocker}/runs"],
        "compare --out is a file": ["compare", "simclr/fashion_mnist", "--out", str(blocker)],
        "gap --out is a file": ["gap", "simclr/fashion_mnist", "--pre-classes", "0,1",
                                "--out", str(blocker)],
        "momentum --out is a file": ["momentum", "simclr/fashion_mnist", "--out", str(blocker)],
    }.items():  # fmt: skip
        found.append(Case("output folder", what, args, "error"))
    taken = root / "taken"
    (taken / "features.npy").mkdir(parents=True)
    embed = ["embed", str(good), "synthetic:test", "-o"]
    outputs = {
        "embed -o a folder": ([*embed, str(root)], "accept"),
        "embed -o . (wrote a hidden ..npy before)": ([*embed, "."], "accept"),
        "export -o a folder": (["export", str(good), "-o", str(root)], "accept"),
        "report -o a folder": (["report", str(good), "-o", str(root)], "accept"),
        "stages --chart a folder": (["stages", str(good), "--chart", str(root)], "accept"),
        "embed -o a folder whose features.npy is a folder": ([*embed, str(taken)], "error"),
    }
    for what, (args, expect) in outputs.items():
        found.append(Case("output file", what, args, expect))
    found += _own_images(root, out)
    return found


def _own_images(root: Path, out: str) -> list[Case]:
    """A folder of your own images through the <method>/folder recipes and `neighbours`."""
    rng = np.random.default_rng(1)
    photos = root / "photos"
    for i in range(24):  # RGB of several sizes, grey, RGBA, 16-bit; a third in a nested folder
        shape = [(20 + i, 16, 3), (16, 18), (17, 17, 4), (16, 16)][i % 4]
        dtype = np.uint16 if i % 4 == 3 else np.uint8
        pixels = rng.integers(0, np.iinfo(dtype).max, shape, dtype)
        _png(photos / ("nested" if i % 3 == 0 else "") / f"{i}.png", pixels)
    beside = root / "classes_and_loose"
    for i in range(4):
        _png(beside / ("a" if i < 2 else "") / f"{i}.png", rng.integers(0, 255, (8, 8), np.uint8))
    train = ["train", "simclr/folder", *TINY, "train.budget_minutes=null", f"train.out_dir={out}"]
    cases = {
        "train simclr/folder without data.root": (train, "error"),
        "data.root is a file": ([*train, f"data.root={root / 'results.txt'}"], "error"),
        "data.labels=folders with images beside the class folders": (
            [*train, f"data.root={beside}", "data.labels=folders"], "error"),
        "data.labels=maybe": ([*train, f"data.root={photos}", "data.labels=maybe"], "error"),
        "data.size=-3": ([*train, f"data.root={photos}", "data.size=-3"], "error"),
        "data.channels=2": ([*train, f"data.root={photos}", "data.channels=2"], "error"),
        "RGB, grey, RGBA and 16-bit images of several sizes, nested": (
            [*train, f"data.root={photos}", "train.name=photos"], "accept"),
        "eval all of a run on unlabelled images": (["eval", "all", f"{out}/photos"], "accept"),
        "neighbours -k larger than the training images": (
            ["neighbours", f"{out}/photos", str(photos / "1.png"), "-k", "50"], "error"),
        "neighbours -o a .txt file": (
            ["neighbours", f"{out}/photos", str(photos / "1.png"), "-o", "n.txt"], "error"),
        "neighbours of an image that does not exist": (
            ["neighbours", f"{out}/photos", str(photos / "missing.png")], "error"),
    }  # fmt: skip
    return [Case("own images", what, args, expect) for what, (args, expect) in cases.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", help="write the markdown table here")
    parser.add_argument("--only", help="run only the cases of this input group, e.g. checkpoint")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows, counts = [], {}
        for case in cases(root):
            if args.only is not None and case.group != args.only:
                continue
            outcome, shown = run_case(case, root)
            counts[outcome] = counts.get(outcome, 0) + 1
            shown = shown.replace(tmp, "…").replace("|", "\\|")
            rows.append(f"| {case.group} | {case.what} | {outcome} | {shown[:220]} |")
            print(rows[-1], file=sys.stderr, flush=True)
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    table = "\n".join(
        [f"{len(rows)} inputs: {summary}.", "", "| input | case | outcome | what the user sees |",
         "|---|---|---|---|", *rows]
    )  # fmt: skip
    if args.output:
        Path(args.output).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
