"""ResNet-18/34/50 (He et al., arXiv 1512.03385) with torchvision's module names and no classifier.

`stem="small"` replaces the 7x7/2 convolution and max-pool with one 3x3/1 convolution, the usual
change for 32x32 images (SimCLR appendix B.9); `width` scales the 64 base channels for CPU-sized
runs. Key names match torchvision's `resnet18/34/50` minus `fc`, so export is an identity map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from selfsup.registry import BACKBONES

STEMS = ("imagenet", "small")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4); stride on the 3x3 as torchvision's "ResNet v1.5"."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk: `forward(x)` (N, C, H, W) -> globally average-pooled (N, num_features)."""

    stage_names = ["layer1", "layer2", "layer3", "layer4"]

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        *,
        in_channels: int = 3,
        stem: str = "imagenet",
        width: float = 1.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem '{stem}'; valid: {', '.join(STEMS)}")
        if not width > 0:
            raise ValueError(f"ResNet width must be > 0 (a multiplier of 64 channels), got {width}")
        planes = [max(1, round(64 * width * 2**i)) for i in range(4)]
        self.inplanes = planes[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:  # small images: keep the resolution, a 28x28 input reaches layer4 at 4x4
            self.conv1 = conv3x3(in_channels, planes[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.num_features = planes[3] * block.expansion

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity (Goyal et al., arXiv 1706.02677)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Outputs of layer1..layer4, each (N, C_i, H_i, W_i)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            stages.append(x)
        return stages

    def forward(self, x: Tensor) -> Tensor:
        # flatten, not view: a channels_last feature map is not contiguous in (N, C, 1, 1) order
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_stages(x)[-1], 1), 1)


def _register(
    name: str, block: type[BasicBlock | Bottleneck], layers: list[int], doc: str
) -> Callable[..., ResNet]:
    """A registered factory `name(*, in_channels, image_size, stem, width, zero_init_residual)`."""

    def factory(
        *,
        in_channels: int = 3,
        image_size: int = 224,
        stem: str = "imagenet",
        width: float = 1.0,
        zero_init_residual: bool = False,
    ) -> ResNet:
        del image_size  # convolutions take any size; accepted so every backbone shares it
        return ResNet(
            block,
            layers,
            in_channels=in_channels,
            stem=stem,
            width=width,
            zero_init_residual=zero_init_residual,
        )

    return BACKBONES.add(name, factory, doc)


resnet18 = _register(
    "resnet18", BasicBlock, [2, 2, 2, 2], "ResNet-18: BasicBlocks [2, 2, 2, 2], 512*width features."
)
resnet34 = _register(
    "resnet34", BasicBlock, [3, 4, 6, 3], "ResNet-34: BasicBlocks [3, 4, 6, 3], 512*width features."
)
resnet50 = _register(
    "resnet50",
    Bottleneck,
    [3, 4, 6, 3],
    "ResNet-50: Bottlenecks [3, 4, 6, 3], 2048*width features.",
)
