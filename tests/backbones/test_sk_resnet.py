"""SimCLR v2's SK-ResNet: the selective-kernel convolution against its formula, ResNet-D's stem and
shortcuts, shapes, gradients, parameter counts of the official models, and bad sk_ratio values."""

import math

import pytest
import torch
import torch.nn.functional as F

import selfsup.backbones  # noqa: F401  (registers the backbones)
from selfsup.backbones.resnet import AvgDown, SKConv
from selfsup.registry import BACKBONES


def sk_resnet50(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = {"name": "resnet50", "width": 0.125, "stem": "small", "sk_ratio": 0.0625}
    return BACKBONES.build({**spec, **kwargs})


def sk_conv(planes: int = 6, stride: int = 1) -> SKConv:
    torch.manual_seed(0)
    conv = SKConv(4, planes, stride, sk_ratio=0.0625)
    for bn in (conv.bn, conv.bn_reduce):  # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return conv.eval()


def images(n=3, channels=4, size=8, seed=1):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def batch_norm_by_hand(x, bn, rows):
    """Eval-mode BN of channels `rows` of `bn`: (x - μ) / sqrt(σ² + ε) · γ + β."""
    shape = (1, -1, 1, 1)
    mean, var = bn.running_mean[rows].view(shape), bn.running_var[rows].view(shape)
    gamma, beta = bn.weight[rows].view(shape), bn.bias[rows].view(shape)
    return (x - mean) / torch.sqrt(var + bn.eps) * gamma + beta


def test_sk_attention_over_the_two_paths_sums_to_one_for_every_sample_and_channel():
    conv = sk_conv().train()
    paths, weights = conv.paths_and_weights(images())
    assert paths.shape == (3, 2, 6, 8, 8) and weights.shape == (3, 2, 6, 1, 1)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, 6, 1, 1))
    assert (weights > 0).all() and (weights < 1).all()
    assert not torch.allclose(weights[:, 0], weights[:, 1])  # a real selection, not 1/2 everywhere


def test_sk_output_is_the_softmax_weighted_sum_of_two_3x3_paths_by_hand():
    conv = sk_conv()
    x = images()
    planes = conv.planes
    with torch.no_grad():
        # Path p: channels [p·planes, (p+1)·planes) of the one 3x3 conv, each with BN + ReLU.
        paths = []
        for p in range(2):
            rows = slice(p * planes, (p + 1) * planes)
            u = F.conv2d(x, conv.conv.weight[rows], padding=1)
            paths.append(batch_norm_by_hand(u, conv.bn, rows).clamp(min=0))
        s = (paths[0] + paths[1]).mean(dim=(2, 3), keepdim=True)  # fuse: global average of the sum
        hidden = F.conv2d(s, conv.fc_reduce.weight)
        z = batch_norm_by_hand(hidden, conv.bn_reduce, slice(None)).clamp(min=0)
        logits = F.conv2d(z, conv.fc_select.weight)
        l0, l1 = logits[:, :planes], logits[:, planes:]
        a0 = torch.exp(l0) / (torch.exp(l0) + torch.exp(l1))  # softmax over the two paths
        expected = a0 * paths[0] + (1 - a0) * paths[1]
        torch.testing.assert_close(conv(x), expected)


def test_sk_attention_hidden_width_is_planes_times_ratio_with_a_floor_of_32():
    conv = SKConv(8, 1024, 1, sk_ratio=0.0625)  # ResNet-50 2x, layer4: 1024 · 0.0625 = 64
    assert conv.fc_reduce.out_channels == 64 and conv.fc_select.out_channels == 2 * 1024
    assert SKConv(8, 64, 1, sk_ratio=0.0625).fc_reduce.out_channels == 32  # 4 < 32


def test_sk_paths_take_the_block_stride():
    conv = sk_conv(stride=2).train()
    paths, _ = conv.paths_and_weights(images())
    assert paths.shape == (3, 2, 6, 4, 4) and conv(images()).shape == (3, 6, 4, 4)


@pytest.mark.parametrize(
    "stem, channels, size, sides",
    [("small", 1, 16, [16, 8, 4, 2]), ("imagenet", 3, 32, [8, 4, 2, 1])],
)
def test_sk_resnet50_shapes_at_small_width(stem, channels, size, sides):
    model = sk_resnet50(stem=stem, in_channels=channels)
    x = torch.randn(2, channels, size, size)
    stages = model.forward_stages(x)
    assert [tuple(s.shape) for s in stages] == [
        (2, 32 * 2**i, side, side) for i, side in enumerate(sides)
    ]
    assert model(x).shape == (2, model.num_features) == (2, 256)
    model.eval()
    assert model(x).shape == (2, 256)


def test_gradient_reaches_both_paths_and_the_attention_of_every_sk_convolution():
    model = sk_resnet50(in_channels=1)
    model(torch.randn(4, 1, 16, 16)).square().sum().backward()
    convs = [m for m in model.modules() if isinstance(m, SKConv)]
    assert len(convs) == 16  # one per bottleneck: 3 + 4 + 6 + 3
    for conv in convs:
        grad = conv.conv.weight.grad
        for path in grad.chunk(2):  # output channels of path 0, then of path 1
            assert path.abs().sum() > 0
        assert conv.fc_reduce.weight.grad.abs().sum() > 0
        assert conv.fc_select.weight.grad.abs().sum() > 0


def test_sk_resnet_uses_resnet_d_deep_stem_and_average_pooled_shortcuts():
    model = sk_resnet50(stem="imagenet")
    stem_convs = [m for m in model.conv1 if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in stem_convs] == [
        (3, 4, 2),
        (4, 4, 1),
        (4, 8, 1),
    ]  # 3x3 convolutions with 64/2, 64/2, 64 channels (width 1/8)
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut[0], AvgDown) and shortcut[0].stride == 2
    assert shortcut[1].stride == (1, 1)  # the pooling, not the 1x1 convolution, strides
    assert isinstance(model.layer2[0].bn2, torch.nn.Identity)  # SKConv has its own BN + ReLU
    assert sk_resnet50(stem="small").conv1.kernel_size == (3, 3)  # the small stem is unchanged


def test_avg_down_follows_tensorflow_padding():
    x = torch.arange(1.0, 26.0).view(1, 1, 5, 5)
    # Stride 2 on an odd size: zero padding at the end counts in the average.
    out = AvgDown(2)(x)
    assert out.shape == (1, 1, 3, 3)
    assert out[0, 0, 0, 0] == (1 + 2 + 6 + 7) / 4
    assert out[0, 0, 2, 2] == 25 / 4
    torch.testing.assert_close(AvgDown(2)(x[..., :4, :4]), F.avg_pool2d(x[..., :4, :4], 2))
    # Stride 1: the mean of the valid elements of each window x[i:i+2, j:j+2] ("SAME").
    out = AvgDown(1)(x)
    assert out.shape == x.shape
    for i in range(5):
        for j in range(5):
            window = x[0, 0, i : i + 2, j : j + 2]
            assert math.isclose(out[0, 0, i, j].item(), window.mean().item(), rel_tol=1e-6)


@pytest.mark.parametrize("width, millions", [(1, 35), (2, 140)])
def test_sk_resnet50_parameter_count_matches_simclr_v2_table_1(width, millions):
    # google-research/simclr README (Table 1 of the paper): R50 1x+SK 35 M, 2x+SK 140 M.
    with torch.device("meta"):
        model = BACKBONES.build({"name": "resnet50", "width": width, "sk_ratio": 0.0625})
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions


def test_sk_ratio_zero_is_the_plain_resnet():
    torch.manual_seed(0)
    plain = BACKBONES.build({"name": "resnet50", "width": 0.125})
    torch.manual_seed(0)
    zero = BACKBONES.build({"name": "resnet50", "width": 0.125, "sk_ratio": 0.0})
    assert set(plain.state_dict()) == set(zero.state_dict())
    assert not any(isinstance(m, (SKConv, AvgDown)) for m in zero.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), zero.eval()(x))


@pytest.mark.parametrize("ratio", [-0.0625, 1.5, float("nan"), float("inf")])
def test_bad_sk_ratio_is_refused_with_the_valid_range(ratio):
    with pytest.raises(ValueError, match=r"sk_ratio must be in \[0, 1\].*0\.0625"):
        BACKBONES.build({"name": "resnet50", "sk_ratio": ratio})


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_basic_block_resnets_refuse_selective_kernels(name):
    with pytest.raises(ValueError, match="needs a bottleneck ResNet"):
        BACKBONES.build({"name": name, "sk_ratio": 0.0625})
    BACKBONES.build({"name": name, "width": 0.125, "sk_ratio": 0.0})  # off: fine


def test_sk_resnet_keys_follow_timm_resnet_d_for_the_stem_and_shortcuts():
    with torch.device("meta"):
        keys = set(BACKBONES.build({"name": "resnet50", "sk_ratio": 0.0625}).state_dict())
    stem = {f"conv1.{i}.weight" for i in (0, 3, 6)} | {f"conv1.{i}.running_var" for i in (1, 4)}
    shortcut = {"layer2.0.downsample.1.weight", "layer2.0.downsample.2.running_mean"}
    sk = {f"layer3.5.conv2.{name}" for name in ("conv.weight", "bn.bias", "fc_reduce.weight")}
    sk |= {"layer3.5.conv2.bn_reduce.running_var", "layer3.5.conv2.fc_select.weight"}
    assert stem | shortcut | sk <= keys
    assert "conv1.weight" not in keys and not any(".bn2." in k for k in keys)
