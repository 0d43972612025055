"""Backbone contract: feature sizes, stage shapes, torchvision/timm names and counts, gradients."""

import copy
import functools

import pytest
import torch

import selfsup.backbones  # noqa: F401  (registers the backbones)
from selfsup.backbones.vit import sincos_2d
from selfsup.registry import BACKBONES

RESNETS = [n for n in BACKBONES.names() if n.startswith("resnet")]
VITS = [n for n in BACKBONES.names() if n.startswith("vit")]
STEMS = ("imagenet", "small")


def small(name: str, **kwargs) -> torch.nn.Module:
    """A CPU-sized instance: width 1/8 small-stem ResNets, ViTs on 32x32 images with 8x8 patches."""
    return copy.deepcopy(build_small(name, tuple(sorted(kwargs.items()))))


@functools.cache  # initialising ViT-Base's 86M weights costs ~1 s; a copy is ~10x cheaper
def build_small(name: str, kwargs: tuple) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("resnet"):
        spec = {"name": name, "width": 0.125, "stem": "small"}
    else:
        spec = {"name": name, "image_size": 32, "patch_size": 8}
    return BACKBONES.build({**spec, **dict(kwargs)})


@pytest.fixture(autouse=True, scope="module")
def free_cached_models():
    yield
    build_small.cache_clear()


def images(n: int = 2, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def resnet_keys(block_counts: list[int], bottleneck: bool) -> set[str]:
    """torchvision's state-dict keys without fc, written out from its naming rules."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = {"conv1.weight"} | {f"bn1.{s}" for s in bn}
    convs = 3 if bottleneck else 2
    for layer, count in enumerate(block_counts, start=1):
        for b in range(count):
            prefix = f"layer{layer}.{b}"
            for c in range(1, convs + 1):
                keys |= {f"{prefix}.conv{c}.weight"} | {f"{prefix}.bn{c}.{s}" for s in bn}
            if b == 0 and (layer > 1 or bottleneck):  # stride 2 or a channel change
                keys |= {f"{prefix}.downsample.0.weight"}
                keys |= {f"{prefix}.downsample.1.{s}" for s in bn}
    return keys


def parameter_count(name: str) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = BACKBONES.build({"name": name})
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", BACKBONES.names())
def test_num_features_matches_forward_output(name):
    model = small(name).eval()
    assert model(images()).shape == (2, model.num_features)
    if name in RESNETS:  # Fashion-MNIST-shaped input
        model = small(name, in_channels=1).eval()
        assert model(images(channels=1, size=28)).shape == (2, model.num_features)


@pytest.mark.parametrize("width, channels", [(0.125, [8, 16, 32, 64]), (0.25, [16, 32, 64, 128])])
def test_resnet_width_scales_base_channels(width, channels):
    model = BACKBONES.build({"name": "resnet18", "width": width, "stem": "small", "in_channels": 1})
    stages = model.forward_stages(images(channels=1, size=28))
    assert [s.shape[1] for s in stages] == channels
    assert model.num_features == channels[-1]
    assert BACKBONES.build({"name": "resnet50", "width": width}).num_features == 4 * channels[-1]


@pytest.mark.parametrize(
    "stem, size, sides", [("small", 32, [32, 16, 8, 4]), ("imagenet", 64, [16, 8, 4, 2])]
)
@pytest.mark.parametrize("name", RESNETS)
def test_resnet_stage_shapes_follow_the_stem(name, stem, size, sides):
    model = small(name, stem=stem)
    stages = model.forward_stages(images(size=size))
    assert model.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    expansion = type(model.layer1[0]).expansion  # 4 for bottlenecks (ResNet-50 and deeper)
    expected = [(2, 8 * 2**i * expansion, side, side) for i, side in enumerate(sides)]
    assert [tuple(s.shape) for s in stages] == expected


@pytest.mark.parametrize("name", VITS)
def test_vit_stages_are_cls_tokens_of_blocks_3_6_9_12(name):
    model = small(name)
    stages = model.forward_stages(images())
    assert model.stage_names == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert [tuple(s.shape) for s in stages] == [(2, model.num_features)] * 4


@pytest.mark.parametrize(
    "name, blocks, bottleneck, count",
    [("resnet18", [2, 2, 2, 2], False, 120), ("resnet50", [3, 4, 6, 3], True, 318)],
)
def test_resnet_keys_are_torchvision_keys_without_fc(name, blocks, bottleneck, count):
    with torch.device("meta"):
        keys = set(BACKBONES.build({"name": name}).state_dict())
    assert keys == resnet_keys(blocks, bottleneck)
    assert len(keys) == count
    examples = ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.bias"]
    examples += ["layer2.0.downsample.0.weight", "layer4.1.bn2.running_var"]
    assert set(examples) <= keys


def test_small_stem_keeps_the_key_names_with_a_3x3_conv1():
    with torch.device("meta"):
        imagenet, smallstem = (BACKBONES.build({"name": "resnet18", "stem": s}) for s in STEMS)
    assert set(imagenet.state_dict()) == set(smallstem.state_dict())
    assert smallstem.conv1.weight.shape == (64, 3, 3, 3)
    assert imagenet.conv1.weight.shape == (64, 3, 7, 7)


@pytest.mark.parametrize(
    "name, count",
    # torchvision resnet18 11,689,512, resnet50 25,557,032, resnet101 44,549,160 and resnet152
    # 60,192,808 minus fc (513,000; 2,049,000 each for the bottleneck ones);
    # timm vit_small_patch16_224 22,050,664 minus its 1000-class head (385,000)
    [
        ("resnet18", 11_176_512),
        ("resnet50", 23_508_032),
        ("resnet101", 42_500_160),
        ("resnet152", 58_143_808),
        ("vit_small", 21_665_664),
    ],
)
def test_parameter_count_matches_reference_without_classifier(name, count):
    assert parameter_count(name) == count


def test_vit_keys_follow_timm():
    keys = set(small("vit_tiny").state_dict())
    for key in ["patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight"]:
        assert key in keys
    for key in [
        "attn.qkv.bias",
        "attn.proj.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc2.bias",
    ]:
        assert f"blocks.11.{key}" in keys
    assert {"norm.weight", "norm.bias"} <= keys
    model = small("vit_tiny", pos_embedding="sincos")
    assert "pos_embed" in model.state_dict()
    assert "pos_embed" not in dict(model.named_parameters())  # fixed, as MoCo v3


@pytest.mark.parametrize("name", BACKBONES.names())
def test_gradients_reach_every_parameter(name):
    model = small(name)
    out = model(images(n=4))
    # a random projection: a plain sum of a LayerNorm output has zero gradient
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, key


def test_freeze_patch_embed_freezes_only_the_patch_projection():
    model = small("vit_tiny", freeze_patch_embed=True)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    model(images()).sum().backward()
    assert model.patch_embed.proj.weight.grad is None


@pytest.mark.parametrize("name", BACKBONES.names())
def test_channels_last_input_gives_the_same_output(name):
    model = small(name).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
    # another summation order in the convolutions. In eval mode before any training (BN running
    # statistics 0 and 1) the residual sums of the deep ResNets grow large (ResNet-152: ~1e7),
    # so the tolerance follows the outputs' scale
    close = {"rtol": 1e-4, "atol": 1e-4 * max(1.0, expected.abs().max().item())}
    with torch.no_grad():
        torch.testing.assert_close(
            model(x.to(memory_format=torch.channels_last)), expected, **close
        )
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(
            model(x.to(memory_format=torch.channels_last)), expected, **close
        )


def test_vit_rejects_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="image_size 30 is not divisible by patch_size 8"):
        BACKBONES.build({"name": "vit_tiny", "image_size": 30, "patch_size": 8})


def test_unknown_resnet_stem_lists_the_valid_stems():
    with pytest.raises(ValueError, match="imagenet, small"):
        BACKBONES.build({"name": "resnet18", "stem": "cifar"})


@pytest.mark.parametrize("pos_embedding", ["learned", "sincos"])
def test_vit_takes_other_crop_sizes(pos_embedding):
    model = small("vit_tiny", pos_embedding=pos_embedding).eval()
    assert model(images(size=16)).shape == (2, 192)  # DINO-style small crops: a 2x2 patch grid
    native = model._pos_embed(4, 4)
    assert native is model.pos_embed


def test_sincos_embedding_is_zero_for_cls_and_sin_cos_of_row_and_column():
    pos = sincos_2d(2, 3, 8)[0]  # quarters: sin(col), cos(col), sin(row), cos(row); omega = 1, 0.01
    assert pos.shape == (7, 8) and pos[0].abs().sum() == 0
    row, col = 1, 2  # patch index 1 + row * 3 + col
    omega = torch.tensor([1.0, 0.01])
    expected = torch.cat(
        [(col * omega).sin(), (col * omega).cos(), (row * omega).sin(), (row * omega).cos()]
    )
    torch.testing.assert_close(pos[1 + row * 3 + col], expected)


def test_zero_init_residual_zeroes_the_last_norm_of_every_block():
    basic = small("resnet18", zero_init_residual=True)
    assert all(
        b.bn2.weight.abs().sum() == 0 for layer in (basic.layer1, basic.layer4) for b in layer
    )
    bottleneck = small("resnet50", zero_init_residual=True)
    assert all(b.bn3.weight.abs().sum() == 0 for b in bottleneck.layer2)


def test_drop_path_is_random_in_training_and_off_in_eval():
    model = small("vit_tiny", drop_path=0.5)
    x = images()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
