"""One self-contained HTML page about finished runs: `selfsup report RUN [RUN ...]`.

Per run: its config summary, the loss and kNN-monitor curves, the collapse guard's indicators
(embed_std, embed_rank), what the evaluations stored (eval.json, stages.json, stats.json,
gradients.json), a 2-D map of test-split encoder features coloured by class, and a
nearest-neighbour retrieval grid (test queries beside their nearest training images by cosine of
the encoder features, the similarity the kNN probe votes with). Across runs: one comparison table.

Every figure is a PNG embedded as a base64 data URI (the charts drawn by selfsup.plot, with
matplotlib) and the CSS is inline; the page has no script and no external URL, so it opens from
disk, offline, and can be mailed as one file. The report only reads the run folders and embeds
seeded subsets of images: the evaluations themselves are the other commands' (`selfsup eval`,
`stages`, `stats`, `gradients`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from selfsup.build import load_data, pick_device
from selfsup.data.datasets import ImageData
from selfsup.data.subsets import seeded_subset
from selfsup.engine.collapse import MIN_RANK, MIN_STD, PATIENCE
from selfsup.engine.log import format_duration
from selfsup.eval.protocols import probes_skipped, stored_results
from selfsup.eval.stages import stage_order
from selfsup.plot import PALETTE, plot_curves, plot_series, plot_stages, save
from selfsup.probes.features import extract
from selfsup.probes.statistics import normalized_std
from selfsup.run import Run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAP_SIZE = 480  # pixels of the square embedding map
TILE = 48  # smallest side of one image in the retrieval grid (small images are enlarged)
SAME, OTHER = "#2ca02c", "#d62728"  # frame of a neighbour of the query's class / of another


@dataclass
class Settings:
    """How much of each run the report embeds (seeded subsets keep it fast on a CPU)."""

    map_images: int = 1000  # test images on the embedding map
    bank_images: int = 2000  # training images the retrieval searches
    queries: int = 6  # test images whose neighbours are shown
    neighbours: int = 8  # nearest training images per query
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("map_images", "bank_images", "queries", "neighbours"):
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, name)}")


@dataclass
class Retrieval:
    """Test queries and their nearest training images: indices into the two splits."""

    queries: Tensor  # (Q,) into the test split
    bank: Tensor  # (B,) into the train split: the images searched
    neighbours: Tensor  # (Q, k) into the train split, nearest first


def nearest_neighbours(
    queries: Tensor, bank: Tensor, k: int, exclude: Tensor | None = None
) -> Tensor:
    """Indices (Q, k) of the k rows of `bank` (B, D) with the highest cosine similarity
    cos(q, b) = q·b / (‖q‖ ‖b‖) to each row of `queries` (Q, D), most similar first; `exclude`
    (Q, B) bool: pairs never chosen (a query that is itself in the bank)."""
    if k > len(bank):
        raise ValueError(f"{k} nearest neighbours asked of {len(bank)} images; lower --neighbours")
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    if exclude is not None:
        similarity = similarity.masked_fill(exclude, float("-inf"))
    return similarity.topk(k, dim=1).indices


def project_2d(features: Tensor, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates of the L2-normalised features and the projection's name.

    t-SNE (van der Maaten & Hinton 2008, JMLR 9, "Visualizing Data using t-SNE"; scikit-learn's,
    PCA-initialised, perplexity min(30, (N-1)/3), seeded) when scikit-learn is installed (the
    `report` extra), else PCA: the projections on the top two principal directions, the right
    singular vectors of the centred features. On the unit sphere, Euclidean distance is a
    monotone function of cosine similarity, ‖a − b‖² = 2 − 2 cos(a, b): the map keeps the
    neighbourhoods the kNN probe sees. Collapsed features (normalized_std below the collapse
    guard's floor) get PCA too: scikit-learn's t-SNE crashes on identical points.
    """
    unit = F.normalize(features.double(), dim=1)
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return _pca(unit), "PCA (scikit-learn is not installed: no t-SNE)"
    spread = normalized_std(unit)
    if spread < MIN_STD:
        return _pca(unit), f"PCA (the features have collapsed, std {spread:.2g}: no t-SNE)"
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    perplexity = min(30.0, (len(unit) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # One OpenMP thread: each of the ~1000 short Barnes-Hut iterations ends at a barrier, and one
    # busy core then stalls them all (1000 points on 2 loaded cores: 38 s with 2 threads, 4 s)
    with threadpool_limits(limits=1, user_api="openmp"):
        points = tsne.fit_transform(unit.numpy())
    return points, f"t-SNE (scikit-learn, perplexity {perplexity:.3g})"


def _pca(features: Tensor) -> np.ndarray:
    """Projections (N, 2) of the centred features on their top two principal directions."""
    centred = features - features.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:2].T).numpy()


def retrieval(
    train: ImageData,
    test: ImageData,
    settings: Settings,
    features: Callable[[Tensor], Tensor],
) -> Retrieval:
    """`settings.queries` seeded test images and their `settings.neighbours` nearest images among
    `settings.bank_images` seeded training images, by cosine of `features` (images -> (N, D)).
    When `test` is `train` (a set without a test split), a query is never its own neighbour."""
    queries = seeded_subset(len(test), settings.queries, settings.seed)
    bank = seeded_subset(len(train), settings.bank_images, settings.seed + 1)
    exclude = queries[:, None] == bank[None, :] if test is train else None
    nearest = nearest_neighbours(
        features(test.images[queries]), features(train.images[bank]), settings.neighbours, exclude
    )
    return Retrieval(queries, bank, bank[nearest])


def write_report(
    run_dirs: Sequence[str | Path | Run],
    output: str | Path = "report.html",
    settings: Settings | None = None,
) -> Path:
    """Write the HTML page about `run_dirs` to `output` and return its path."""
    if not run_dirs:
        raise ValueError("report needs at least one run folder")
    settings = settings or Settings()
    runs = [r if isinstance(r, Run) else Run(r) for r in run_dirs]
    labels = [r.path.resolve().name for r in runs]
    if len(set(labels)) < len(labels):  # folders of one name in different places: full paths
        labels = [str(r.path) for r in runs]
    sections = [
        _run_section(run, label, i, settings)
        for i, (run, label) in enumerate(zip(runs, labels, strict=True))
    ]
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = [
        "<h1>selfsup report</h1>",
        f"<p class='note'>{len(runs)} run{'s' if len(runs) > 1 else ''}, written {made}. Embedding"
        f" map: up to {settings.map_images} test images; retrieval: {settings.queries} test "
        f"queries among up to {settings.bank_images} training images; subsets seeded by "
        f"{settings.seed}.</p>",
        "<h2>Comparison</h2>",
        _comparison(runs, labels),
        *sections,
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>selfsup report: {_escape(', '.join(labels))}</title><style>{CSS}</style>"
        "</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1180px; margin: 1.5em auto;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; }
section.run { margin-top: 2.5em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 0.4em 0; }
img.pixels { image-rendering: pixelated; }
.note { color: #555; } .warn { color: #b00; font-weight: 600; }
.legend span { display: inline-block; margin-right: 1em; white-space: nowrap; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em;
          vertical-align: -0.1em; border-radius: 50%; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def _escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """An HTML table; numbers right-aligned, every cell escaped."""
    head = "".join(f"<th>{_escape(h)}</th>" for h in header)
    lines = []
    for row in rows:
        cells = "".join(
            f"<td class='num'>{_escape(_number(v))}</td>"
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            else f"<td>{_escape(_number(v))}</td>"
            for v in row
        )
        lines.append(f"<tr>{cells}</tr>")
    attr = f" class='{cls}'" if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _img(image: Image.Image | Figure, alt: str, pixels: bool = False) -> str:
    """An <img> of a picture or of a chart of selfsup.plot, its PNG inside the page as a base64
    data URI."""
    buffer = io.BytesIO()
    if isinstance(image, Image.Image):
        image.save(buffer, format="PNG")
    else:
        save(image, buffer, format="png")
    with Image.open(buffer) as png:  # reads the header only
        width, height = png.size
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    cls = " class='pixels'" if pixels else ""
    return f"<img{cls} src='{uri}' alt='{_escape(alt)}' width='{width}' height='{height}'>"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _seconds(metrics: list[dict[str, Any]]) -> float:
    trained = [r["seconds"] for r in metrics if "seconds" in r]
    return trained[-1] if trained else float("nan")


def _accuracy(run: Run, metrics: list[dict[str, Any]], key: str) -> str:
    """eval.json's value of `key`; for kNN without one, the online monitor's last value."""
    stored = stored_results(run)
    if key in stored:
        return f"{stored[key]:.2f}"
    monitor = [r[key] for r in metrics if key in r and "event" not in r]
    return f"{monitor[-1]:.2f} (monitor)" if monitor else "–"


def _comparison(runs: list[Run], labels: list[str]) -> str:
    rows = []
    for run, label in zip(runs, labels, strict=True):
        metrics, config = run.metrics, run.config
        collapse = run.collapse_event()
        rows.append(
            [
                label,
                config.method["name"],
                config.backbone["name"],
                config.data["name"],
                round(run.epochs, 4),
                max((r["step"] for r in metrics if "loss" in r), default=0),
                format_duration(_seconds(metrics)),
                _accuracy(run, metrics, "knn_top1"),
                _accuracy(run, metrics, "linear_top1"),
                f"at step {collapse['step']}" if collapse else "no",
            ]
        )
    header = ["run", "method", "backbone", "data", "epochs", "steps", "training time",
              "kNN top-1 (%)", "linear top-1 (%)", "collapsed"]  # fmt: skip
    note = (
        "<p class='note'>Accuracies from each run's eval.json (<code>selfsup eval all RUN</code>);"
        " “(monitor)”: not evaluated yet, the online kNN monitor's last value instead.</p>"
    )
    return _table(header, rows, "comparison") + note


def _options(section: dict[str, Any]) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in section.items() if k != "name")
    return f"{section['name']} ({rest})" if rest else section["name"]


def _summary(run: Run, metrics: list[dict[str, Any]]) -> str:
    config = run.config
    start = next((r for r in metrics if r.get("event") == "start"), {})
    rows = [
        ["method", _options(config.method)],
        ["backbone", _options(config.backbone)],
        ["data", _options(config.data)],
        ["views", config.views["name"]],
        [
            "optimizer",
            f"{config.optim.name}, lr {config.optim.lr}, batch {config.optim.batch_size}",
        ],
        ["epochs", round(run.epochs, 4)],
        ["steps trained", max((r["step"] for r in metrics if "loss" in r), default=0)],
        ["training time", format_duration(_seconds(metrics))],
        ["parameters", start.get("parameters", "–")],
        ["seed", config.train.seed],
    ]
    return _table(["setting", "value"], rows, "summary")


def _collapse_part(run: Run, metrics: list[dict[str, Any]], label: str) -> str:
    checks = [r for r in metrics if "embed_std" in r]
    floors = (
        f"The collapse guard embeds 256 fixed training images at every log step; a run counts as "
        f"collapsed when embed_std &lt; {MIN_STD} and embed_rank &lt; {MIN_RANK} for {PATIENCE} "
        f"checks in a row."
    )
    parts = ["<h3>Collapse indicators</h3>", f"<p class='note'>{floors}</p>"]
    collapse = run.collapse_event()
    if collapse is not None:
        parts.append(f"<p class='warn'>Stopped: {_escape(collapse['message'])}</p>")
    if not checks:
        why = "was off" if not run.config.train.collapse_guard else "is newer than this run"
        parts.append(f"<p>No embed_std / embed_rank in metrics.jsonl: the guard {why}.</p>")
        return "\n".join(parts)
    last = checks[-1]
    parts.append(
        f"<p>Last check (step {last['step']}): embed_std {last['embed_std']:.3g}, "
        f"embed_rank {last['embed_rank']:.3g}.</p>"
    )
    for key, floor, meaning in (
        ("embed_std", MIN_STD, "spread of the normalised embeddings (0: collapsed)"),
        ("embed_rank", MIN_RANK, "effective rank of the embeddings (1: collapsed)"),
    ):
        series = {key: [(r["step"], r[key]) for r in checks]}
        title = f"{label}: {key}, {meaning}"
        floors = {f"collapse floor ({floor:g})": floor}
        chart = plot_series(series, None, "step", key, title, thresholds=floors)
        parts.append(_img(chart, f"{key} against step"))
    return "\n".join(parts)


def _eval_part(run: Run) -> str:
    stored = stored_results(run)
    skipped = probes_skipped(run)
    if not stored and skipped is not None:
        return f"<h3>Evaluation</h3><p class='note'>Probes skipped: {_escape(skipped)}.</p>"
    if not stored:
        return (
            "<h3>Evaluation</h3><p class='note'>No eval.json yet: "
            f"<code>selfsup eval all {_escape(run.path)}</code></p>"
        )
    rows = [[key, value] for key, value in stored.items()]
    note = "<p class='note'>Accuracies in %.</p>"
    return "<h3>Evaluation (eval.json)</h3>" + note + _table(["result", "value"], rows, "eval")


def _stages_part(run: Run, label: str) -> str:
    stored = _read_json(run.path / "stages.json")
    if not stored:
        return ""
    order = stage_order(stored)
    keys = [
        k for k in ("linear_top1", "knn_top1") if any(k in r for rs in stored.values() for r in rs)
    ]
    header = ["stage"] + [f"{data} {key}" for data in stored for key in keys]
    values = {data: {row["stage"]: row for row in rows} for data, rows in stored.items()}
    rows = [
        [stage] + [values[data].get(stage, {}).get(key, "–") for data in stored for key in keys]
        for stage in order
    ]
    key = keys[0]  # linear, unless only kNN was probed
    lines = {
        data: [(r["stage"], r[key]) for r in found if key in r] for data, found in stored.items()
    }
    ylabel = key.replace("_top1", " top-1 (%)")
    title = f"{label}: {ylabel} per stage"
    chart = plot_stages(lines, order, ylabel=ylabel, title=title)
    return (
        "<h3>Stage-wise probes (stages.json)</h3>"
        + _img(chart, "probe accuracy per stage")
        + _table(header, rows, "stages")
    )


def _stats_part(run: Run) -> str:
    stored = _read_json(run.path / "stats.json")
    if not stored:
        return ""
    splits = list(stored)
    keys = list(dict.fromkeys(key for split in splits for key in stored[split]))
    rows = [[key] + [stored[split].get(key, "–") for split in splits] for key in keys]
    header = ["statistic"] + [f"{split} split" for split in splits]
    return "<h3>Feature statistics (stats.json)</h3>" + _table(header, rows, "stats")


def _gradients_part(run: Run) -> str:
    stored = _read_json(run.path / "gradients.json")
    if not stored:
        return ""
    rows = [[key, value] for key, value in stored.items()]
    return "<h3>Gradient decomposition (gradients.json)</h3>" + _table(
        ["scalar", "value"], rows, "gradients"
    )


def _as_pil(image: Tensor, side: int) -> Image.Image:
    """A uint8 (C, H, W) image enlarged by a whole factor to at least `side` pixels (nearest)."""
    array = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    picture = Image.fromarray(array[..., 0] if array.shape[2] != 3 else array)
    factor = max(1, -(-side // max(picture.size)))
    return picture.convert("RGB").resize(
        (picture.width * factor, picture.height * factor), Image.NEAREST
    )


def _color(label: int) -> str:
    return PALETTE[label % len(PALETTE)]


def _scatter(points: np.ndarray, labels: Tensor | None) -> Image.Image:
    """The 2-D points as dots on a square canvas, each coloured by its class."""
    image = Image.new("RGB", (MAP_SIZE, MAP_SIZE), "white")
    draw = ImageDraw.Draw(image)
    low, extent = points.min(0), np.ptp(points, axis=0)
    scaled = (points - low) / np.where(extent > 0, extent, 1) * (MAP_SIZE - 24) + 12
    pixels = np.where(extent > 0, scaled, MAP_SIZE / 2)  # no extent (collapsed): in the middle
    for i, (x, y) in enumerate(pixels):
        color = _color(int(labels[i])) if labels is not None else "#1f77b4"
        draw.ellipse([x - 2.5, MAP_SIZE - y - 2.5, x + 2.5, MAP_SIZE - y + 2.5], fill=color)
    draw.rectangle([0, 0, MAP_SIZE - 1, MAP_SIZE - 1], outline="#888888")
    return image


def _grid(found: Retrieval, train: ImageData, test: ImageData) -> Image.Image:
    """One row per query: the query, a gap, then its neighbours nearest first, each framed green
    when of the query's class and red otherwise (grey without labels)."""
    tile = _as_pil(test.images[0], TILE).width
    pad, gap = 4, 16
    cell = tile + 2 * pad
    rows, k = found.neighbours.shape
    image = Image.new("RGB", (cell * (k + 1) + gap, cell * rows), "white")
    draw = ImageDraw.Draw(image)
    for row, query in enumerate(found.queries.tolist()):
        y = row * cell
        image.paste(_as_pil(test.images[query], TILE), (pad, y + pad))
        draw.rectangle([1, y + 1, cell - 2, y + cell - 2], outline="#000000", width=2)
        for col, index in enumerate(found.neighbours[row].tolist()):
            x = cell * (col + 1) + gap
            image.paste(_as_pil(train.images[index], TILE), (x + pad, y + pad))
            if train.labels is None or test.labels is None:
                color = "#888888"
            else:
                same = int(train.labels[index]) == int(test.labels[query])
                color = SAME if same else OTHER
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline=color, width=3)
    return image


def _features_part(run: Run, label: str, settings: Settings) -> str:
    if not run.has_checkpoint:
        return "<h3>Embedding map and retrieval</h3><p class='note'>No checkpoint to embed.</p>"
    config = run.config
    train, split = load_data(config, "train"), config.eval.test_split
    if probes_skipped(run) is None:
        test = load_data(config, split)
    else:  # no labels, and so no test split (an unlabelled folder): its training images
        test, split = train, "train"
    searched = min(settings.bank_images, len(train))
    if settings.neighbours > searched:
        raise ValueError(
            f"--neighbours {settings.neighbours} is more than the {searched} training images "
            f"searched ({len(train)} in {run.path}'s train split, --bank-images "
            f"{settings.bank_images}); lower --neighbours"
        )
    encoder = run.encoder.to(pick_device(settings.device))

    def features(images: Tensor) -> Tensor:
        return extract(encoder, images, run.views.eval_transform, config.eval.batch_size)

    shown = seeded_subset(len(test), settings.map_images, settings.seed)
    points, projection = project_2d(features(test.images[shown]), settings.seed)
    labels = test.labels[shown] if test.labels is not None else None
    classes = test.classes or [str(c) for c in range(test.num_classes or 0)]
    legend = "".join(
        f"<span><i class='swatch' style='background:{_color(c)}'></i>{_escape(name)}</span>"
        for c, name in enumerate(classes)
    )
    parts = [
        "<h3>Embedding map</h3>",
        f"<p class='note'>{len(shown)} {_escape(split)} images (seeded), encoder features "
        f"L2-normalised, projected to 2-D by {_escape(projection)}"
        f"{'; colour: class' if labels is not None else ' (no labels)'}.</p>",
        _img(_scatter(points, labels), f"{label}: 2-D map of {split} features"),
        f"<p class='legend'>{legend}</p>" if labels is not None else "",
    ]
    found = retrieval(train, test, settings, features)
    caption = (
        f"Each row: a seeded {_escape(split)} image (black frame), then its "
        f"{settings.neighbours} nearest of {len(found.bank)} seeded training images by cosine "
        f"of the encoder features, nearest first"
        + ("; green frame: the query's class, red: another." if labels is not None else ".")
    )
    if test.labels is not None and train.labels is not None:
        same = (train.labels[found.neighbours] == test.labels[found.queries, None]).float()
        caption += f" {100 * same.mean():.0f} % of the neighbours shown share the query's class."
    parts += [
        "<h3>Nearest-neighbour retrieval</h3>",
        f"<p class='note'>{caption}</p>",
        _img(_grid(found, train, test), f"{label}: queries and nearest training images", True),
    ]
    return "\n".join(parts)


def _run_section(run: Run, label: str, index: int, settings: Settings) -> str:
    metrics = run.metrics
    training = [r for r in metrics if "event" not in r]  # evaluations' lines have no epoch
    curves = plot_curves(training, title=label)
    parts = [
        f"<section class='run' id='run-{index + 1}'>",
        f"<h2>{_escape(label)}</h2>",
        f"<p class='note'>{_escape(run.path.resolve())}</p>",
        _summary(run, metrics),
        "<h3>Training curves</h3>",
        _img(curves, f"{label}: loss and kNN monitor"),
        _collapse_part(run, metrics, label),
        _eval_part(run),
        _stages_part(run, label),
        _stats_part(run),
        _gradients_part(run),
        _features_part(run, label, settings),
        "</section>",
    ]
    return "\n".join(part for part in parts if part)
