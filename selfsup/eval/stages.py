"""Stage-wise probes: where in the network the transferable features are.

A linear probe (and optionally kNN) on the frozen output of every encoder stage, of the encoder
itself, and of every layer of the method's projector. Linear classifier probes on intermediate
layers are Alain & Bengio's (arXiv 1610.01644); Goyal et al. (arXiv 1905.01235) probe each
ResNet stage of self-supervised models, whose best stage is not always the last. SimCLR
(Chen et al. 2020, arXiv 2002.05709, §4.2, Fig. 8) finds the representation h before the
projection head linearly better than z = g(h) after it, and SimCLR v2 (arXiv 2006.10029, §2)
fine-tunes from the projector's first layer instead of h. The probes measure this on one run and
compare runs (self-supervised with a projector, without one, supervised) on one chart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.build import pick_device
from selfsup.eval.protocols import PROTOCOLS, probe, probe_data
from selfsup.files import merge_json
from selfsup.heads import mlp_blocks
from selfsup.plot import plot_stages
from selfsup.probes.features import extract
from selfsup.run import Run

ENCODER = "encoder"  # the row of the encoder's own output (what `evaluate` probes)


def projector_names(count: int) -> list[str]:
    """Row names of a projector with `count` layers: projector.1 .. projector.{count-1}, then
    projector.out (z, the output the loss sees)."""
    return [f"projector.{i}" for i in range(1, count)] + ["projector.out"]


def _pooled(output: Tensor) -> Tensor:
    """A stage's output as one vector per image: a feature map (N, C, H, W) globally
    average-pooled as the ResNet pools its last stage; tokens (N, T, D): the CLS token."""
    if output.dim() == 4:
        return torch.flatten(F.adaptive_avg_pool2d(output, 1), 1)
    return output[:, 0]


class StageFeatures(nn.Module):
    """encoder + projector blocks whose forward returns every stage's features side by side,
    (N, Σ D_i), in the order of `names`, from one pass.

    The stages are read by forward hooks on the encoder's `stage_names` modules (ResNet: layer1..4,
    ViT: blocks.i), removed after each pass, so the encoder computes exactly its own forward.
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module | None) -> None:
        super().__init__()
        stages = getattr(encoder, "stage_names", None)
        if stages is None:
            raise ValueError(
                f"the encoder is a {type(encoder).__name__} without stages (stage_names); "
                f"stage-wise probes need a ResNet or ViT backbone as the encoder (not CPC's "
                f"patch grid or CMC's encoders side by side)"
            )
        self.encoder, self.stages = encoder, list(stages)
        if isinstance(projector, nn.Identity):  # SimCLR's layers=0: no projection head
            projector = None
        self.blocks = nn.ModuleList(mlp_blocks(projector) if projector is not None else [])
        heads = projector_names(len(self.blocks)) if projector is not None else []
        self.names = [*self.stages, ENCODER, *heads]
        self.widths: list[int] = []  # of each stage's features, set by forward

    def forward(self, x: Tensor) -> Tensor:
        captured: list[Tensor] = []
        hooks = [
            self.encoder.get_submodule(name).register_forward_hook(
                lambda module, inputs, output: captured.append(_pooled(output))
            )
            for name in self.stages
        ]
        try:
            h = self.encoder(x)
        finally:
            for hook in hooks:
                hook.remove()
        assert len(captured) == len(self.stages), "a stage module ran more or less than once"
        features = [*captured, h]
        for block in self.blocks:
            features.append(block(features[-1]))
        self.widths = [f.shape[1] for f in features]
        return torch.cat([f.flatten(1) for f in features], dim=1)


def _projector(run: Run) -> nn.Module | None:
    """The method's projector g (SimCLR, BYOL, SimSiam, MoCo, ...), None for a method without
    one (supervised, finetune, distill; DINO's head and CMC's heads are not read)."""
    return getattr(run.method, "projector", None)


def stage_features(
    run: Run,
    images: Tensor,
    transform: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Frozen features of uint8 images (N, C, H, W) at every stage of a run's network, in order:
    {stage name: float32 (N, D) on the CPU}.

    Encoder stages: ResNet layer1..layer4 globally average-pooled, ViT's CLS token after each
    block of `stage_names` (before the final norm); "encoder": the encoder's output (after the
    ResNet pool / ViT norm), identical to `features.extract` of the encoder; with a projector,
    the output of each of its layers (projector.1, ..., projector.out). One pass per batch
    (`features.extract`: eval mode, no gradients, the run's eval.batch_size); `transform`
    defaults to the run's evaluation transform.
    """
    model = StageFeatures(run.encoder, _projector(run)).to(device)
    transform = transform or run.views.eval_transform
    columns = extract(model, images, transform, run.config.eval.batch_size, device)
    return dict(zip(model.names, columns.split(model.widths, dim=1), strict=True))


def stage_probes(
    run_dir: str | Path | Run,
    data: str | dict[str, Any] | None = None,
    protocols: list[str] | tuple[str, ...] = ("linear",),
    device: str = "auto",
) -> list[dict[str, Any]]:
    """One row per stage (`stage_features`, in order): {"stage", "dim", "linear_top1"
    [, "knn_top1"]}, test accuracies in % of probes trained on the train split's features.

    The probes are `evaluate`'s: the same linear probe (eval.linear_epochs, the weight decay
    chosen from eval.linear_weight_decay on eval.linear_val_fraction of train, train.seed) and
    kNN (eval.knn_k, eval.knn_temperature), each stage's features standardised on their own.
    With `data` (a dataset name or spec), transfer as in `evaluate`: dataset B's train and test
    splits, resized to the run's image size, normalised with the run's statistics.

    The rows are saved in <run>/stages.json under the dataset's name (other datasets' rows kept).
    """
    protocols = list(protocols)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(
            f"stage-wise probes take protocols from {', '.join(PROTOCOLS)}, got {protocols}"
        )
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    config = run.config
    name, train, test, transform = probe_data(run, data)
    target = pick_device(device)
    train_f = stage_features(run, train.images, transform, target)
    test_f = stage_features(run, test.images, transform, target)
    rows = []
    for stage, features in train_f.items():
        results = probe(config, protocols, features, train, test_f[stage], test)
        row: dict[str, Any] = {"stage": stage, "dim": features.shape[1]}
        row.update({f"{p}_top1": results[f"{p}_top1"] for p in ("linear", "knn") if p in protocols})
        rows.append(row)
    merge_json(run.path / "stages.json", lambda merged: merged.update({name: rows}))
    return rows


def stage_order(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Every stage of several runs' rows ({run label: rows}) in network order.

    A stage's place is its distance from the encoder row, the largest over the runs (projector.out
    of a 3-layer projector comes after projector.2 of any run); equal places keep first
    appearance (ResNet layer1 beside ViT blocks.2).
    """
    place: dict[str, int] = {}
    for rows in results.values():
        stages = [row["stage"] for row in rows]
        for i, stage in enumerate(stages):
            offset = i - stages.index(ENCODER)
            place[stage] = max(place.get(stage, offset), offset)
    return sorted(place, key=lambda stage: place[stage])  # stable: ties keep first appearance


def stage_table(results: dict[str, list[dict[str, Any]]], key: str = "linear_top1") -> str:
    """A text table: one row per stage (`stage_order`), one column of `key` per run; "-" where a
    run has no such stage."""
    order = stage_order(results)
    values = {label: {row["stage"]: row[key] for row in rows} for label, rows in results.items()}
    width = max(len(stage) for stage in order) + 2
    columns = {label: max(len(label), 6) + 2 for label in results}
    lines = [f"{'stage':{width}s}" + "".join(f"{lb:>{w}s}" for lb, w in columns.items())]
    for stage in order:
        cells = [
            f"{values[label][stage]:{w}.2f}" if stage in values[label] else f"{'-':>{w}s}"
            for label, w in columns.items()
        ]
        lines.append(f"{stage:{width}s}" + "".join(cells))
    return "\n".join(lines)


def chart_name(data: str | None = None) -> str:
    """The file name of the stages chart: stages.png, or stages-<data>.png for a transfer."""
    return f"stages-{data}.png" if data else "stages.png"


def compare_stages(
    run_dirs: list[str | Path],
    data: str | None = None,
    protocols: list[str] | tuple[str, ...] = ("linear",),
    device: str = "auto",
    chart: str | Path | None = None,
) -> tuple[str, Path]:
    """`stage_probes` of several runs: text tables (one per protocol: a row per stage, a column
    per run, labelled by its folder name) and a chart of linear top-1 against stage, one line per
    run, written to `chart` (default: <first run>/stages.png, stages-<data>.png for transfer).
    Returns (tables, chart path)."""
    results: dict[str, list[dict[str, Any]]] = {}
    for run_dir in run_dirs:
        label = Path(run_dir).resolve().name
        results[str(run_dir) if label in results else label] = stage_probes(
            run_dir, data, protocols, device
        )
    where = f" on {data}" if data else ""
    tables = [
        f"{p}_top1 (%) per stage{where}\n{stage_table(results, f'{p}_top1')}" for p in protocols
    ]
    path = Path(chart) if chart is not None else Path(run_dirs[0]) / chart_name(data)
    key = f"{protocols[0]}_top1"  # linear, unless only kNN was asked for
    lines = {label: [(r["stage"], r[key]) for r in rows] for label, rows in results.items()}
    ylabel = f"{protocols[0]} top-1 (%)"
    plot_stages(lines, stage_order(results), path, ylabel, f"{ylabel} per stage{where}")
    return "\n\n".join(tables), path
