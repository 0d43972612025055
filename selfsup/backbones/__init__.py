"""Backbones register themselves in BACKBONES on import; one line per backbone module."""

from typing import Any

from torch import nn

import selfsup.backbones.resnet  # noqa: F401
import selfsup.backbones.vit  # noqa: F401
from selfsup.registry import BACKBONES


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name, e.g. `create_backbone("resnet18", stem="small")`."""
    return BACKBONES.build({"name": name, **kwargs})


def layer_norm_for_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d replaced, in place, by a layer norm over (C, H, W) of each
    sample (GroupNorm with one group, an affine weight and bias per channel, under the same
    name): no statistic is shared between the samples of a batch (CPC v2's encoder). Other
    modules, a ViT's layer norms among them, are left as they are."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features, eps=child.eps))
        else:
            layer_norm_for_batch_norm(child)
    return module


__all__ = ["create_backbone", "layer_norm_for_batch_norm"]
