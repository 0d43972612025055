"""A run's encoder written for use outside selfsup: its weights as a state dict, or an ONNX model.

The ONNX model is what `embed` computes of images already at the run's size, as one graph:
input "images", float32 (N, C, S, S) scaled to [0, 1] (pixel / 255; C channels as the run's data,
grey or RGB; S the run's image size); the run's normalisation (the data's mean and std, or CMC's
Lab conversion) inside the graph; output "features", float32 (N, D), the encoder's features. N is
dynamic. Resizing an image to S (embed: its centre square, resized) is the caller's part.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from selfsup.extras import require
from selfsup.run import Run

FORMATS = ("state_dict", "onnx")
DEFAULT_NAMES = {"state_dict": "encoder.pt", "onnx": "encoder.onnx"}
# the opset torch's exporter implements natively (no version conversion); onnxruntime >= 1.14
# runs it
OPSET = 18
INPUT, OUTPUT = "images", "features"
ONNX_LIBRARIES = ("onnx", "onnxscript")  # torch.onnx.export(dynamo=True) needs both

log = logging.getLogger(__name__)


class Deployed(nn.Module):
    """`embed`'s features of images in [0, 1] at the run's size: the eval transform (its resize is
    then the identity, so only the normalisation remains), the encoder, rows flattened as
    `probes.features.extract` flattens them."""

    def __init__(self, encoder: nn.Module, transform: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.encoder, self.transform = encoder, transform

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(self.transform(images)).flatten(1)


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown export format '{format}'; valid: {', '.join(FORMATS)}")


def export(
    run_dir: str | Path | Run, output: str | Path | None = None, format: str = "state_dict"
) -> Path:
    """Write the run's encoder to `output` (default <run>/encoder.pt or encoder.onnx).

    format "state_dict": the encoder's weights (a ResNet or ViT backbone: torchvision / timm key
    names). "onnx": the model of this module's docstring (`describe_onnx` says its input and
    output), with the extra `pip install "selfsup[onnx]"`.
    """
    check_format(format)
    if format == "onnx":
        require("onnx", ONNX_LIBRARIES, "exporting to ONNX")
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    path = Path(output) if output is not None else run.path / DEFAULT_NAMES[format]
    if format == "onnx":
        _export_onnx(run, path)
    else:
        state = {k: v.detach().clone() for k, v in run.encoder.state_dict().items()}
        torch.save(state, path)
    return path


def _export_onnx(run: Run, path: Path) -> None:
    info = run.info
    model = Deployed(run.encoder, run.views.eval_transform).eval()
    # batch 2, not 1: torch.export specialises a dimension of size 1 to a constant
    example = torch.rand(2, info["channels"], info["image_size"], info["image_size"])
    name = f"{run.config.method['name']} with {run.config.backbone['name']}"
    # the exporter prints its progress, warns about optional torchvision ops and, when it fails,
    # dumps its graphs: keep all of it out of the command's output (one line, what was written
    # or why not); the log keeps it at debug level
    torch_log, printed = logging.getLogger("torch"), io.StringIO()
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(printed),
            contextlib.redirect_stderr(printed),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    except torch.onnx.OnnxExporterError as error:
        cause = error.__cause__ or error  # torch.export's own error says what it met
        reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
        raise ValueError(
            f"the encoder of {run.path} ({name}) cannot be exported to ONNX ({reason}); "
            f"export its weights with --format state_dict"
        ) from error
    finally:
        torch_log.setLevel(level)
        log.debug("torch.onnx.export printed:\n%s", printed.getvalue())
    features = program.model.graph.outputs[0].shape[1]
    color_space = run.views.color_space
    line = contract(info["channels"], info["image_size"], features, color_space)
    program.model.doc_string = f"selfsup encoder of {run.path.name} ({name}): {line}"
    program.model.metadata_props.update(
        method=run.config.method["name"],
        backbone=run.config.backbone["name"],
        color_space=color_space,
        input_range="0..1",
    )
    program.save(path, external_data=False)  # one file: the weights inside


def contract(channels: int, side: int, features: int, color_space: str = "rgb") -> str:
    """The input and output of an exported ONNX model, as one line."""
    kind = {1: "grey", 3: "RGB"}.get(channels, f"{channels}-channel")
    inside = "Lab conversion and normalisation" if color_space == "lab" else "normalisation"
    return (
        f"input '{INPUT}' float32 (N, {channels}, {side}, {side}), {kind} pixels / 255 in "
        f"[0, 1] ({inside} inside the model); output '{OUTPUT}' float32 (N, {features})"
    )


def describe_onnx(path: str | Path) -> str:
    """The input/output line of an ONNX model this module wrote, read from the file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def shape(value: onnx.ValueInfoProto) -> list[int | str]:
        dims = value.type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]

    _, channels, side, _ = shape(model.graph.input[0])
    features = shape(model.graph.output[0])[1]
    color_space = {p.key: p.value for p in model.metadata_props}.get("color_space", "rgb")
    return contract(channels, side, features, color_space)
