"""`selfsup report`: one HTML file with every figure inside, the runs' numbers in its tables, the
true nearest neighbours in its retrieval grid, opened in a real headless browser if there is one."""

from __future__ import annotations

import base64
import builtins
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import selfsup
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.engine.collapse import CollapseError
from selfsup.eval.protocols import evaluate
from selfsup.eval.stages import stage_probes
from selfsup.probes.features import extract
from selfsup.report import Settings, nearest_neighbours, project_2d, retrieval, write_report
from selfsup.run import Run

SMALL = Settings(map_images=120, bank_images=150, queries=3, neighbours=4, seed=3, device="cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_run(root, name):
    """SimCLR trained for four steps on 16x16 synthetic images, evaluated (kNN and a 5-iteration
    linear probe) and probed stage by stage."""
    config = {
        "method": {"name": "simclr", "hidden": 24, "dim": 12},
        "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
        "data": {"name": "synthetic", "per_class": 16, "size": 16},
        "views": {"name": "simclr", "size": 16, "blur_p": 0.0, "strength": 0.5},
        "optim": {"name": "sgd", "lr": 0.1, "batch_size": 32},
        "train": {"epochs": 1, "max_steps": 4, "out_dir": str(root), "name": name,
                  "progress": False, "log_every": 2},
        "eval": {"linear_epochs": 5, "linear_weight_decay": 1e-4, "knn_k": 5,
                 "monitor_train": 100, "monitor_test": 50},
    }  # fmt: skip
    run = selfsup.train(resolve(config))
    evaluate(run, ["knn", "linear"], device="cpu")
    stage_probes(run, device="cpu")
    return run


class Page(HTMLParser):
    """The <img> sources, <section> classes and <table> classes of an HTML page."""

    def __init__(self, text):
        super().__init__()
        self.images, self.sections, self.tables = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "section":
            self.sections.append(attrs.get("class"))
        elif tag == "table":
            self.tables.append(attrs.get("class"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained run and a copy of it under another name whose eval.json says other numbers."""
    root = tmp_path_factory.mktemp("runs")
    first = tiny_run(root, "first")
    shutil.copytree(first.path, root / "second")
    stored = json.loads((first.path / "eval.json").read_text())
    shifted = {key: value / 2 for key, value in stored.items()}
    (root / "second" / "eval.json").write_text(json.dumps(shifted))
    return Run(first.path), Run(root / "second")


@pytest.fixture(scope="module")
def two_pages(runs, tmp_path_factory):
    path = write_report(list(runs), tmp_path_factory.mktemp("html") / "two.html", SMALL)
    return path


def decoded_png(source):
    prefix = "data:image/png;base64,"
    assert source.startswith(prefix), source[:60]
    data = base64.b64decode(source[len(prefix) :], validate=True)
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # raises on a truncated or corrupt PNG
    return Image.open(io.BytesIO(data))


def test_every_image_is_an_embedded_png_and_no_url_leaves_the_file(two_pages):
    text = two_pages.read_text()
    page = Page(text)
    # per run: curves, embed_std, embed_rank, stages chart, embedding map, retrieval grid
    assert len(page.images) == 12
    for source in page.images:
        assert decoded_png(source).size > (10, 10)
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text).lower()
    assert "http" not in outside and "//" not in outside and "url(" not in outside
    assert "<script" not in outside and "<link" not in outside
    assert not re.search(r"""(src|href)=['"](?!data:image/png;base64,)""", text)


def test_tables_show_the_runs_config_evaluation_and_stage_probes(runs, two_pages):
    run = runs[0]
    first = two_pages.read_text().split("<section class='run' id='run-2'>")[0]
    stored = json.loads((run.path / "eval.json").read_text())
    stages = json.loads((run.path / "stages.json").read_text())["synthetic"]
    comparison = first.split("<table class='comparison'>")[1].split("</table>")[0]
    assert f"<td>{stored['knn_top1']:.2f}</td>" in comparison
    assert f"<td>{stored['linear_top1']:.2f}</td>" in comparison
    assert "<td>simclr</td><td>resnet18</td><td>synthetic</td>" in comparison
    assert "<td class='num'>4</td>" in comparison  # steps trained
    eval_table = first.split("<table class='eval'>")[1].split("</table>")[0]
    assert f"<td class='num'>{stored['linear_top1']:.4g}</td>" in eval_table
    stage_table = first.split("<table class='stages'>")[1].split("</table>")[0]
    for row in stages:
        assert f"<tr><td>{row['stage']}</td><td class='num'>{row['linear_top1']:.4g}" in stage_table
    last = [r for r in run.metrics if "embed_std" in r][-1]
    assert f"embed_std {last['embed_std']:.3g}, embed_rank {last['embed_rank']:.3g}" in first
    assert "t-SNE (scikit-learn" in first


def test_two_runs_give_two_sections_and_one_comparison_table_with_both(runs, two_pages):
    text = two_pages.read_text()
    page = Page(text)
    assert page.sections == ["run", "run"]
    assert page.tables.count("comparison") == 1
    comparison = text.split("<table class='comparison'>")[1].split("</table>")[0]
    assert comparison.count("<tr><td>") == 2
    for run in runs:
        knn = json.loads((run.path / "eval.json").read_text())["knn_top1"]
        assert f"<tr><td>{run.path.name}</td>" in comparison
        assert f"<td>{knn:.2f}</td>" in comparison
    assert len(page.images) == 12


def test_nearest_neighbours_are_the_top_k_by_cosine_written_as_a_loop():
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(5, 7, generator=generator), torch.randn(40, 7, generator=generator)
    bank[3] = 10 * queries[0]  # same direction, other length: cosine 1, the first neighbour
    found = nearest_neighbours(queries, bank, k=6)
    for q, query in enumerate(queries.double()):
        cosine = [float(query @ b / (query.norm() * b.norm())) for b in bank.double()]
        assert found[q].tolist() == sorted(range(len(bank)), key=lambda i: -cosine[i])[:6]
    assert found[0, 0] == 3
    with pytest.raises(ValueError, match="41 nearest neighbours asked of 40"):
        nearest_neighbours(queries, bank, k=41)


def test_the_retrieval_grid_of_a_run_shows_its_true_nearest_training_images(runs):
    run = runs[0]
    train = selfsup.build.load_data(run.config, "train")
    test = selfsup.build.load_data(run.config, "test")
    encoder, transform = run.encoder.cpu(), run.views.eval_transform

    def features(images):
        return extract(encoder, images, transform)

    found = retrieval(train, test, SMALL, features)
    assert len(found.queries) == SMALL.queries and len(found.bank) == SMALL.bank_images
    assert found.neighbours.shape == (SMALL.queries, SMALL.neighbours)
    bank_f = features(train.images[found.bank])
    for query, nearest in zip(found.queries, found.neighbours, strict=True):
        query_f = features(test.images[query : query + 1])[0]
        cosine = torch.nn.functional.cosine_similarity(bank_f, query_f[None], dim=1)
        expected = found.bank[cosine.topk(SMALL.neighbours).indices]
        assert nearest.tolist() == expected.tolist()
    again = retrieval(train, test, SMALL, features)  # seeded: the same images every time
    assert torch.equal(again.queries, found.queries) and torch.equal(again.bank, found.bank)


def test_without_scikit_learn_the_map_is_the_top_two_principal_components(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(50, 6, generator=generator) * torch.tensor([5, 3, 1, 1, 1, 1]) + 4
    points, name = project_2d(features)
    assert name.startswith("PCA")
    unit = torch.nn.functional.normalize(features.double(), dim=1).numpy()
    centred = unit - unit.mean(0)
    _, vectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    expected = centred @ vectors[:, ::-1][:, :2]  # the two largest eigenvalues' directions
    for axis in range(2):  # a principal direction's sign is arbitrary
        sign = np.sign(points[:, axis] @ expected[:, axis])
        np.testing.assert_allclose(points[:, axis], sign * expected[:, axis], atol=1e-9)


def test_report_command_writes_the_page_and_names_a_folder_that_is_not_a_run(
    runs, tmp_path, capsys
):
    out = tmp_path / "cli.html"
    flags = ["--map-images", "60", "--bank-images", "50", "--queries", "2", "--neighbours", "3"]
    assert main(["report", str(runs[0].path), "-o", str(out), *flags, "--device", "cpu"]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    assert len(Page(out.read_text()).images) == 6
    assert main(["report", str(tmp_path), "-o", str(out)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["report", str(runs[0].path), "--neighbours", "0"]) == 2
    assert "--neighbours must be >= 1, got 0" in capsys.readouterr().err


def test_a_collapsed_run_shows_the_guards_message_and_still_gets_its_map(
    collapsed_simclr, tmp_path
):
    config = resolve(
        {
            "method": {"name": "simclr", "hidden": 16, "dim": 8},
            "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
            "data": {"name": "synthetic", "per_class": 4, "size": 16},
            "views": {"name": "simclr", "size": 16, "blur_p": 0.0},
            "optim": {"name": "sgd", "lr": 0.1, "batch_size": 8},
            "train": {
                "epochs": 2,
                "out_dir": str(tmp_path),
                "name": "collapsed",
                "progress": False,
                "log_every": 2,
                "knn_every": 0,
            },
        }  # fmt: skip
    )
    with pytest.raises(CollapseError):
        selfsup.train(config)
    run = Run(tmp_path / "collapsed")
    event = next(r for r in run.metrics if r.get("event") == "collapse")
    settings = Settings(map_images=40, bank_images=40, queries=2, neighbours=3, device="cpu")
    text = write_report([run], tmp_path / "collapsed.html", settings).read_text()
    assert f"<td>at step {event['step']}</td>" in text
    assert f"<p class='warn'>Stopped: {html.escape(event['message'])}</p>" in text
    assert len(Page(text).images) == 5  # curves, embed_std, embed_rank, map, retrieval
    assert "by PCA (the features have collapsed" in text  # t-SNE would crash on identical points


def test_more_neighbours_than_training_images_searched_is_refused(runs, tmp_path):
    settings = Settings(map_images=20, bank_images=5, queries=1, neighbours=6, device="cpu")
    with pytest.raises(ValueError, match="--neighbours 6 is more than the 5 training images"):
        write_report([runs[0]], tmp_path / "x.html", settings)


# The page has no script; the browser test adds this one to a copy so that the dumped DOM says how
# many images decoded (naturalWidth > 0) once the page has loaded.
CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0);
  document.body.setAttribute("data-images", images.length);
  document.body.setAttribute("data-loaded", loaded.length);
});
</script>"""


def browser():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    browser() is None,
    reason="chromium (or chromium-browser) is not on PATH: scripts/setup.sh installs it when run "
    "as root (apt-get install chromium)",
)
def test_a_headless_browser_loads_every_figure_and_draws_a_page_that_is_not_blank(
    two_pages, tmp_path
):
    checked = tmp_path / "checked.html"
    checked.write_text(two_pages.read_text().replace("</body>", CHECK + "</body>"))
    shot = tmp_path / "page.png"
    flags = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]  # fmt: skip
    dom = subprocess.run(
        [*flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    images = int(re.search(r'data-images="(\d+)"', body).group(1))
    assert images == len(Page(two_pages.read_text()).images) == 12
    assert f'data-loaded="{images}"' in body
    shooting = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,3000", two_pages.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shooting.returncode == 0 and shot.is_file(), shooting.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (3000, 1200)
    dark = (pixels < 128).mean()  # text, axes and images: a blank page has none
    assert 0.005 < dark < 0.5
    assert len(np.unique(pixels)) > 20
