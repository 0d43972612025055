"""Images given in memory: `selfsup.train("simclr", data=images, labels=labels)` trains on a
uint8 array or tensor without writing files first.

The arrays stay in this process: `remember` checks them, keeps them under a key made from their
content (blake2b of the pixels and labels) and returns the data spec `{name: array, key, shape,
labelled}` that the run's config.yaml holds; the `array` dataset (datasets.py) serves them back
by that key. The run folder itself has everything `embed`, `export` and `neighbours` with a
folder need (data.json: channels, size, normalisation). What needs the images again (`evaluate`,
`report`, `neighbours` in the training images) works in the process that trained the run, or in a
later one after `remember(images, labels)` with the same arrays (the same key).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfsup.augment import ops
from selfsup.data.folder import AUTO, AUTO_MAX_SIZE

logger = logging.getLogger(__name__)

# key -> (images uint8 (N, C, H, W), labels int64 (N,) or None) of this process
ARRAYS: dict[str, tuple[Tensor, Tensor | None]] = {}
CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (laid over white, as an RGBA file is)


def as_images(data: Any) -> Tensor:
    """A uint8 array or tensor (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4 ->
    uint8 (N, C, H, W) with C 1 or 3 on the CPU; anything else is one line saying what to give.

    A 4-D array is (N, H, W, C) when only its last dimension can be channels, (N, C, H, W) when
    only its second can; when both can, the layout is ambiguous and refused. A 3-D array whose
    last side is 1, 3 or 4 is taken for one (H, W, C) image, and refused too.
    """
    expected = "a uint8 array or tensor of shape (N, H, W), (N, H, W, C) or (N, C, H, W), C 1/3/4"
    if isinstance(data, Tensor):
        images = data.detach().cpu()
        dtype = str(images.dtype).removeprefix("torch.")
    elif isinstance(data, np.ndarray):
        images, dtype = data, str(data.dtype)
    else:
        raise ValueError(f"data= takes {expected}; got {type(data).__name__}")
    if dtype != "uint8":
        hint = (
            "; floats in [0, 1]: (x * 255).round() as uint8"
            if "float" in dtype
            else "; 16-bit: x // 257 as uint8"
            if dtype in ("uint16", "int32")
            else ""
        )
        raise ValueError(f"data= takes {expected}; got dtype {dtype}{hint}")
    images = torch.as_tensor(images) if isinstance(images, np.ndarray) else images
    shape = tuple(images.shape)
    if images.ndim == 3 and shape[2] in CHANNELS:
        raise ValueError(
            f"data= of shape {shape} looks like one (H, W, C) image, not (N, H, W) images "
            f"{shape[2]} px wide; give a batch (N, H, W, C), e.g. x[None]"
        )
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        last, second = shape[3] in CHANNELS, shape[1] in CHANNELS
        if last and second:
            raise ValueError(
                f"data= of shape {shape} is ambiguous: (N, H, W, C) or (N, C, H, W)? Give "
                f"images larger than 4 px a side, or (N, H, W, C) with channels last"
            )
        if not (last or second):
            raise ValueError(f"data= takes {expected}; shape {shape} has no 1, 3 or 4 channels")
        images = images.permute(0, 3, 1, 2) if last else images
    else:
        raise ValueError(f"data= takes {expected}; got {images.ndim} dimensions {shape}")
    if len(images) == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"data= holds no pixels (shape {shape})")
    if images.shape[1] == 4:  # over white: colour · alpha + 255 · (1 - alpha)
        alpha = images[:, 3:].float() / 255
        images = (images[:, :3].float() * alpha + 255 * (1 - alpha)).round().to(torch.uint8)
    return images.contiguous()


def as_labels(labels: Any, count: int) -> Tensor | None:
    """Class ids (N,) from 0 as int64, or None; anything else is one line."""
    if labels is None:
        return None
    values = (
        labels.detach().cpu() if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    )
    if values.is_floating_point() or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"labels= must be whole class ids (0, 1, 2, ...), got {values.dtype}")
    if values.shape != (count,):
        raise ValueError(
            f"labels= must have one class id per image, shape ({count},); got {tuple(values.shape)}"
        )
    if count and int(values.min()) < 0:
        raise ValueError(
            f"labels= must be class ids from 0, got {int(values.min())} (leave labels=None for "
            f"unlabelled images)"
        )
    return values.long()


def content_key(images: Tensor, labels: Tensor | None) -> str:
    """A name of the arrays by their content: the same pixels and labels, the same key."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(tuple(images.shape)).encode())
    digest.update(memoryview(images.numpy()).cast("B"))
    if labels is not None:
        digest.update(memoryview(labels.numpy()).cast("B"))
    return digest.hexdigest()


def remember(data: Any, labels: Any = None) -> dict[str, Any]:
    """Check images (and labels) given in memory and keep them for this process; returns the
    data spec of the `array` dataset that serves them (what the run's config.yaml holds)."""
    images = as_images(data)
    ids = as_labels(labels, len(images))
    key = content_key(images, ids)
    ARRAYS[key] = (images, ids)
    return {"name": "array", "key": key, "shape": list(images.shape), "labelled": ids is not None}


def recall(key: str | None, shape: list[int] | None) -> tuple[Tensor, Tensor | None]:
    """The arrays kept under `key`, or one line saying where they are and how to give them."""
    if key in ARRAYS:
        return ARRAYS[key]
    if key is None:
        raise ValueError(
            "dataset 'array' serves images given in memory: selfsup.train(method, data=images)"
        )
    described = "x".join(map(str, shape)) if shape else "?"
    raise FileNotFoundError(
        f"the images of this run (array {key}, {described}) were given in memory to "
        f"selfsup.train() in another process; give them to this one with "
        f"selfsup.data.memory.remember(images, labels) (the same arrays), or evaluate in the "
        f"process that trained it"
    )


def resize(images: Tensor, size: int, chunk: int = 1024) -> Tensor:
    """The centre square of each image resized to (size, size), uint8 (as an image folder's
    data.size does to each file), in chunks so the float copy stays small."""
    if images.shape[2] == images.shape[3] == size:
        return images
    out = [
        ops.resize(part, size).mul_(255).round_().to(torch.uint8) for part in images.split(chunk)
    ]
    return torch.cat(out)


def settle(spec: dict[str, Any]) -> dict[str, Any]:
    """The array spec with `size` auto decided from the arrays' shape (the shorter side, at most
    AUTO_MAX_SIZE: data/folder.py) and logged in one line: what a run writes into config.yaml."""
    count, channels, height, width = spec["shape"]
    size = spec.get("size", AUTO)
    if size == AUTO:
        size = min(height, width, AUTO_MAX_SIZE)
    labelled = "labelled" if spec.get("labelled") else "no labels (the probes will be skipped)"
    logger.info(
        f"selfsup: {count} images in memory ({height}x{width}, {channels} channel"
        f"{'s' if channels > 1 else ''}), {labelled}: data.size={size}, written to the run's "
        f"config.yaml"
    )
    return {**spec, "size": size}
