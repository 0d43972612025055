"""Backbones register themselves in BACKBONES on import; one line per backbone module."""

from typing import Any

from torch import nn

import selfsup.backbones.resnet  # noqa: F401
import selfsup.backbones.vit  # noqa: F401
from selfsup.registry import BACKBONES


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name, e.g. `create_backbone("resnet18", stem="small")`."""
    return BACKBONES.build({"name": name, **kwargs})


__all__ = ["create_backbone"]
