"""ResNet-18/34/50 (He et al., arXiv 1512.03385) with torchvision's module names and no classifier.

`stem="small"` replaces the 7x7/2 convolution and max-pool with one 3x3/1 convolution, the usual
change for 32x32 images (SimCLR appendix B.9); `width` scales the 64 base channels for CPU-sized
runs. Key names match torchvision's `resnet18/34/50` minus `fc`, so export is an identity map.

`sk_ratio > 0` builds SimCLR v2's SK-ResNet (arXiv 2006.10029 §2, Table 1; official code
tf2/resnet.py, flag `sk_ratio`, "recommendation: 0.0625"), which changes three things at once, as
that code does: every bottleneck's 3x3 convolution becomes a selective-kernel convolution (`SKConv`,
Li et al. 2019, arXiv 1903.06586), and the network takes ResNet-D's stem and shortcuts (He et al.
2018, arXiv 1812.01187): the 7x7/2 stem convolution becomes three 3x3 convolutions (64/2, 64/2, 64
channels, the first with stride 2), and a projection shortcut average-pools before its stride-1
1x1 convolution (`AvgDown`). The small stem stays one 3x3 convolution (the official `cifar_stem`
is unchanged by SK too). Bottleneck ResNets only: SimCLR v2 and its code give basic blocks no SK
convolution (the code's flag would change only their stem and shortcuts), so resnet18/34 refuse.
With `sk_ratio=0` (the default) nothing differs from the plain ResNet, state-dict keys included.
With SK, the stem and shortcut keys are those of timm's ResNet-D (`conv1.0`, `conv1.1`, ...,
`downsample.1` the 1x1 conv); `conv2` is an `SKConv` with the names below.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.registry import BACKBONES

STEMS = ("imagenet", "small")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class SKConv(nn.Module):
    """Selective-kernel 3x3 convolution as SimCLR v2's code builds it (SK_Conv2D in tf2/resnet.py).

    Two paths (a 3x3 convolution with 2·planes outputs split into halves: both paths are plain
    3x3 with the block's stride; SKNet's second path is a dilated 3x3, the official code's is not),
    each with BN + ReLU. Fuse: s = global average of the paths' sum (N, planes, 1, 1); select:
    z = ReLU(BN(W_r s)) with max(⌊planes · sk_ratio⌋, 32) channels, a = softmax over the two paths
    of W_s z (N, 2, planes, 1, 1), one weight per sample, path and channel; output Σ_p a_p · U_p.
    W_r, W_s are 1x1 convolutions without bias. The output is already BN'd and ≥ 0 (a convex
    combination of ReLU outputs), so the bottleneck puts no BN + ReLU after it (as the code).
    """

    min_dim = 32  # the official code's floor on the attention's hidden width

    def __init__(self, inplanes: int, planes: int, stride: int, sk_ratio: float) -> None:
        super().__init__()
        self.planes = planes
        self.conv = conv3x3(inplanes, 2 * planes, stride)  # both paths in one convolution
        self.bn = nn.BatchNorm2d(2 * planes)
        hidden = max(int(planes * sk_ratio), self.min_dim)
        self.fc_reduce = conv1x1(planes, hidden)
        self.bn_reduce = nn.BatchNorm2d(hidden)
        self.fc_select = conv1x1(hidden, 2 * planes)

    def paths_and_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two paths U (N, 2, planes, H, W) and their attention a (N, 2, planes, 1, 1)."""
        paths = F.relu(self.bn(self.conv(x))).unflatten(1, (2, self.planes))
        fused = paths.sum(dim=1).mean(dim=(2, 3), keepdim=True)  # (N, planes, 1, 1)
        hidden = F.relu(self.bn_reduce(self.fc_reduce(fused)))
        logits = self.fc_select(hidden).unflatten(1, (2, self.planes))  # (N, 2, planes, 1, 1)
        return paths, logits.softmax(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        paths, weights = self.paths_and_weights(x)
        return (paths * weights).sum(dim=1)


class AvgDown(nn.Module):
    """ResNet-D's shortcut pooling as SimCLR v2's code does it (before the shortcut's 1x1 conv).

    Stride 2: zero-pad one row and column at the end, then 2x2 average pooling with stride 2 (the
    padding counts as zeros; it is used only on odd sizes). Stride 1 (layer1's channel change):
    2x2 average pooling with stride 1 and TensorFlow's "SAME" padding at the end, the padding left
    out of the average, so the size stays. (timm's ResNet-D uses the identity at stride 1.)
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            out = F.avg_pool2d(x, 2, stride=1, padding=1, count_include_pad=False)
            return out[..., 1:, 1:]  # windows starting at (i, j): x[i:i+2, j:j+2]
        return F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, stride=self.stride)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


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
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        sk_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        if sk_ratio > 0:  # SKConv ends in its own BN + ReLU (its docstring)
            self.conv2: nn.Module = SKConv(planes, planes, stride, sk_ratio)
            self.bn2: nn.Module = nn.Identity()
        else:
            self.conv2 = conv3x3(planes, planes, stride)
            self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))  # with SK: the ReLU of a ReLU, a no-op
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
        sk_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem '{stem}'; valid: {', '.join(STEMS)}")
        if not width > 0:
            raise ValueError(f"ResNet width must be > 0 (a multiplier of 64 channels), got {width}")
        if not (math.isfinite(sk_ratio) and 0 <= sk_ratio <= 1):
            raise ValueError(
                f"ResNet sk_ratio must be in [0, 1]: 0 for no selective kernels, else the SK "
                f"attention's reduction (SimCLR v2: 0.0625), got {sk_ratio}"
            )
        if sk_ratio > 0 and block is not Bottleneck:
            raise ValueError(
                f"sk_ratio={sk_ratio} needs a bottleneck ResNet (resnet50): SimCLR v2 defines "
                "selective kernels only for the bottleneck's 3x3 convolution, and resnet18/34 "
                "have basic blocks; use resnet50 (a small `width` for CPU runs) or sk_ratio 0"
            )
        self.sk_ratio = sk_ratio
        planes = [max(1, round(64 * width * 2**i)) for i in range(4)]
        self.inplanes = planes[0]
        if stem == "imagenet" and sk_ratio > 0:  # ResNet-D's deep stem, as SimCLR v2's SK models
            half = max(1, planes[0] // 2)
            self.conv1: nn.Module = nn.Sequential(
                conv3x3(in_channels, half, stride=2),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                conv3x3(half, half),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                conv3x3(half, planes[0]),
            )
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "imagenet":
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
        out = planes * block.expansion
        if (stride != 1 or self.inplanes != out) and self.sk_ratio > 0:  # ResNet-D shortcut
            downsample = nn.Sequential(
                AvgDown(stride), conv1x1(self.inplanes, out), nn.BatchNorm2d(out)
            )
        elif stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, out, stride),
                nn.BatchNorm2d(out),
            )
        sk = {"sk_ratio": self.sk_ratio} if self.sk_ratio > 0 else {}  # basic blocks take none
        layers = [block(self.inplanes, planes, stride, downsample, **sk)]
        self.inplanes = out
        layers += [block(self.inplanes, planes, **sk) for _ in range(1, blocks)]
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
    """A registered factory `name(*, in_channels, image_size, stem, width, zero_init_residual,
    sk_ratio)`."""

    def factory(
        *,
        in_channels: int = 3,
        image_size: int = 224,
        stem: str = "imagenet",
        width: float = 1.0,
        zero_init_residual: bool = False,
        sk_ratio: float = 0.0,  # > 0: SimCLR v2's SK-ResNet (module docstring); paper: 0.0625
    ) -> ResNet:
        del image_size  # convolutions take any size; accepted so every backbone shares it
        return ResNet(
            block,
            layers,
            in_channels=in_channels,
            stem=stem,
            width=width,
            zero_init_residual=zero_init_residual,
            sk_ratio=sk_ratio,
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
resnet101 = _register(
    "resnet101",
    Bottleneck,
    [3, 4, 23, 3],
    "ResNet-101: Bottlenecks [3, 4, 23, 3], 2048*width features.",
)
resnet152 = _register(  # SimCLR v2's biggest encoder: ResNet-152, width 3, SK (Table 1)
    "resnet152",
    Bottleneck,
    [3, 8, 36, 3],
    "ResNet-152: Bottlenecks [3, 8, 36, 3], 2048*width features.",
)
