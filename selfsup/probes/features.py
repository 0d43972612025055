"""Frozen features for the evaluation protocols: encoder outputs, or raw pixels as a baseline."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def extract(
    encoder: Callable[[Tensor], Tensor],
    images: Tensor,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> Tensor:
    """Encoder features of uint8 images (N, C, H, W) -> float32 (N, D) on the CPU.

    Runs in eval mode (BatchNorm uses running statistics) without gradients, `batch_size` images
    at a time; `transform` turns a uint8 batch into the encoder's float input. A Module's
    train/eval flags are restored afterwards, each submodule's own, so a partly frozen model comes
    back exactly as it was. `device` defaults to the Module's parameter device, else the CPU.
    """
    if len(images) == 0:
        raise ValueError("extract() got no images: the dataset split is empty")
    is_module = isinstance(encoder, nn.Module)
    if device is None:
        first = next(encoder.parameters(), None) if is_module else None
        device = first.device if first is not None else "cpu"
    modes = {m: m.training for m in encoder.modules()} if is_module else {}
    if is_module:
        encoder.eval()
    chunks = []
    try:
        # no_grad, not inference_mode: inference tensors cannot enter autograd later (linear probe)
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = transform(images[start : start + batch_size].to(device))
                chunks.append(encoder(batch).flatten(1).float().cpu())
    finally:
        for module, training in modes.items():
            module.training = training
    return torch.cat(chunks)


def pixel_features(images: Tensor) -> Tensor:
    """Raw-pixel baseline: uint8 (N, C, H, W) or (N, H, W) -> float32 (N, C*H*W) in [0, 1]."""
    return images.reshape(len(images), -1).float().div_(255)
