import pytest
import torch
from torch import nn

import selfsup.backbones  # noqa: F401  (registers BACKBONES)
from selfsup.registry import BACKBONES
from selfsup.step import Progress


class TinyBackbone(nn.Module):
    """conv-BN-ReLU-pool: the smallest encoder with batch norm, for formula-level method tests."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu().mean(dim=(2, 3))


@pytest.fixture
def tiny_backbone():
    torch.manual_seed(0)
    return TinyBackbone()


@pytest.fixture
def two_views():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 1, 8, 8, generator=generator) for _ in range(2)]


@pytest.fixture
def progress():
    return Progress(step=0, epoch=0.0, fraction=0.0)


# The registry's real backbones at their smallest, on 1 x 16 x 16 images.
REAL_BACKBONES = {
    "resnet18": {"name": "resnet18", "stem": "small", "width": 0.125},
    "vit_tiny": {"name": "vit_tiny", "patch_size": 8},
}


@pytest.fixture(params=sorted(REAL_BACKBONES))
def real_backbone(request):
    torch.manual_seed(0)
    return BACKBONES.build(REAL_BACKBONES[request.param], in_channels=1, image_size=16)
