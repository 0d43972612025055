"""Batched augmentation ops and view presets: each claim checked on behaviour, seeded."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from selfsup.augment import ops
from selfsup.augment.views import MultiView, ViewSpec
from selfsup.registry import VIEWS

LUMA = torch.tensor([0.299, 0.587, 0.114])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 64, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images in [0.05, 0.95] (away from the clamps), float (n, C, s, s)."""
    coarse = torch.rand(n, channels, 4, 4, generator=gen(seed))
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return 0.05 + 0.9 * x


def uint8_images(n: int = 32, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen(1))


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which samples differ."""
    return (a - b).flatten(1).abs().amax(1) > 1e-5


def saturate(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The views' saturation: a colour matrix that scales chroma by factor (N,), no hue turn."""
    return ops.apply_color_matrix(x, ops.color_matrix(factor, torch.zeros_like(factor)))


def rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """The views' hue jitter: a colour matrix that turns the hue by turns (N,), saturation 1."""
    return ops.apply_color_matrix(x, ops.color_matrix(torch.ones_like(turns), turns))


# ---- views: shapes, range, determinism -------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["simclr", "moco_v1", "moco_v2", "byol", "simsiam", "none"])
def test_presets_give_float_views_of_the_requested_size(name, channels):
    views = VIEWS.build({"name": name, "size": 24})
    large, small = views(uint8_images(channels=channels), gen())
    assert len(large) == 2 and small == []
    for view in large:
        assert view.shape == (32, channels, 24, 24) and view.dtype == torch.float32
        assert view.min() >= -1 and view.max() <= 1  # [0, 1] normalised with 0.5 / 0.5


@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_keeps_views_in_unit_range_before_normalisation(channels):
    spec = ViewSpec(size=20, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1, blur_p=0.5, solarize_p=0.5)
    y = spec(uint8_images(channels=channels), gen())
    assert y.shape == (32, channels, 20, 20)
    assert y.min() >= 0 and y.max() <= 1


def test_same_seed_gives_identical_views_and_other_seeds_differ():
    x, views = uint8_images(), VIEWS.build({"name": "byol", "size": 32})
    first, second, other = views(x, gen(7)), views(x, gen(7)), views(x, gen(8))
    for a, b, c in zip(first[0], second[0], other[0], strict=True):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_views_stay_on_the_images_device_with_a_cpu_generator(device):
    # meta tensors raise on any mix with CPU tensors, so this catches a missing .to(device)
    x = uint8_images().to(device)
    for name in VIEWS.names():
        views = VIEWS.build({"name": name, "size": 16})
        large, small = views(x, gen())
        assert all(v.device.type == device for v in large + small)
        assert views.eval_transform(x).shape == (32, 3, 16, 16)


def test_multicrop_presets_give_small_views():
    large, small = VIEWS.build({"name": "dino", "size": 32, "num_small": 3})(uint8_images(), gen())
    assert [v.shape[-1] for v in large] == [32, 32] and [v.shape[-1] for v in small] == [14] * 3
    _, small = VIEWS.build({"name": "swav", "size": 32, "small_size": 16})(uint8_images(), gen())
    assert len(small) == 6 and small[0].shape[-1] == 16


def test_recipe_lists_and_overrides_reach_the_view_specs():
    views = VIEWS.build({"name": "simclr", "size": 28, "scale": [0.2, 1.0], "blur_p": 0.0})
    assert views.size == 28 and views.large[0].scale == (0.2, 1.0) and views.large[0].blur_p == 0
    assert VIEWS.build({"name": "simclr", "strength": 0.5}).large[0].jitter == (0.4, 0.4, 0.4, 0.1)
    assert "scale=(0.2, 1.0)" in views.describe() and views.spec["large"][1]["size"] == 28


def test_invalid_view_parameters_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="jitter_p"):
        ViewSpec(jitter_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        ViewSpec(scale=(0.5, 0.2))
    views = VIEWS.build({"name": "none"})
    with pytest.raises(ValueError, match="std"):
        views.set_stats([0.5], [0.0])
    views.set_stats([0.5] * 3, [0.2] * 3)
    with pytest.raises(ValueError, match="3 channels"):
        views(uint8_images(channels=1), gen())


def test_none_views_are_identical_and_equal_the_eval_transform():
    views = VIEWS.build({"name": "none"})
    views.set_stats([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    x = uint8_images()
    (a, b), _ = views(x, gen())
    expected = (x.float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(1, 3, 1, 1)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(views.eval_transform(x), expected, atol=1e-5, rtol=0)


def test_eval_transform_resizes_the_centre_square():
    views = VIEWS.build({"name": "simclr", "size": 16})
    x = uint8_images(size=32)
    out = views.eval_transform(torch.cat([x[..., :4], x, x[..., -4:]], dim=-1))  # (N, 3, 32, 40)
    reference = F.interpolate(x.float() / 255, size=16, mode="bilinear", antialias=True)
    torch.testing.assert_close(out, (reference - 0.5) / 0.5, atol=1e-5, rtol=0)


# ---- random resized crop and flip --------------------------------------------------------------


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 0.5)])
def test_crop_boxes_stay_in_the_image_and_in_the_requested_scale_and_ratio(scale):
    height, width = 224, 256
    boxes = ops.sample_crop_boxes(4000, height, width, scale, (3 / 4, 4 / 3), gen()).double()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)  # sides are rounded to pixels: allow that much slack
    assert area.min() >= scale[0] * 0.97 and area.max() <= scale[1] * 1.03
    assert (w / h).min() >= 0.75 * 0.97 and (w / h).max() <= 4 / 3 * 1.03
    assert area.max() - area.min() > 0.5 * (scale[1] - scale[0])  # the range is used


def test_crop_falls_back_to_a_centred_box_with_clamped_aspect():
    boxes = ops.sample_crop_boxes(50, 20, 100, (0.9, 1.0), (3 / 4, 4 / 3), gen())
    # no 90% box of a 1:5 image has aspect <= 4/3: torchvision's fallback is centred, 27 x 20
    assert (boxes == torch.tensor([0, 36, 20, 27])).all()


def test_crop_of_a_coordinate_image_spans_exactly_the_box():
    size = 32
    rows = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1).expand(40, 1, size, size)
    cols = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(40, 1, size, size)
    x = torch.cat([rows, cols], 1)  # channel 0: row index, channel 1: column index
    boxes = ops.sample_crop_boxes(40, size, size, (0.05, 0.5), (3 / 4, 4 / 3), gen())
    y = ops.resized_crop(x, boxes, size)  # boxes smaller than the output: corners are exact
    top, left, h, w = boxes.float().unbind(1)
    torch.testing.assert_close(y[:, 0].amin((1, 2)), top)
    torch.testing.assert_close(y[:, 0].amax((1, 2)), top + h - 1)
    torch.testing.assert_close(y[:, 1].amin((1, 2)), left)
    torch.testing.assert_close(y[:, 1].amax((1, 2)), left + w - 1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 48])
def test_batched_crop_equals_interpolating_each_box_alone(channels, size):
    x = torch.rand(24, channels, 32, 40, generator=gen())
    boxes = ops.sample_crop_boxes(24, 32, 40, (0.08, 1.0), (3 / 4, 4 / 3), gen(1))
    flip = torch.rand(24, generator=gen(2)) < 0.5
    y = ops.resized_crop(x, boxes, size, flip)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        box = x[i : i + 1, :, top : top + h, left : left + w]
        # plain bilinear where the box is enlarged, antialiased (PIL-like) where it shrinks
        antialias = h > size or w > size
        ref = F.interpolate(box, size=(size, size), mode="bilinear", antialias=antialias)[0]
        torch.testing.assert_close(y[i], ref.flip(-1) if flip[i] else ref, atol=1e-5, rtol=0)


def test_flip_mirrors_exactly_and_only_flagged_samples():
    x, boxes = images(8), torch.tensor([[0, 0, 32, 32]]).expand(8, 4)
    flip = torch.tensor([True, False] * 4)
    y = ops.resized_crop(x, boxes, 32, flip)
    torch.testing.assert_close(y[flip], x[flip].flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(y[~flip], x[~flip], atol=1e-6, rtol=0)


def test_uint8_crop_with_gain_equals_the_float_crop():
    x = uint8_images()
    boxes = ops.sample_crop_boxes(len(x), 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen())
    a = ops.resized_crop(x, boxes, 24, gain=1 / 255)
    torch.testing.assert_close(a, ops.resized_crop(ops.to_float(x), boxes, 24))


# ---- colour ------------------------------------------------------------------------------------


def test_grayscale_gives_equal_channels_with_itu_601_weights():
    x = images()
    y = ops.grayscale(x)
    expected = (x * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(y, expected.expand_as(x), atol=1e-6, rtol=0)


def test_brightness_rides_in_the_crop_gain_and_scales_the_mean():
    x, factor = images() * 0.5, torch.linspace(0.2, 1.8, 64)
    y = ops.resized_crop(x, torch.tensor([[0, 0, 32, 32]]).expand(64, 4), 32, gain=factor)
    torch.testing.assert_close(y.mean((1, 2, 3)), x.mean((1, 2, 3)) * factor)


@pytest.mark.parametrize("channels", [1, 3])
def test_contrast_keeps_the_mean_luma_and_zero_gives_flat_grey(channels):
    x = 0.25 + 0.5 * images(channels=channels)  # in [0.27, 0.73]: factor 1.5 does not clamp
    weights = LUMA.view(1, 3, 1, 1) if channels == 3 else torch.ones(1, 1, 1, 1)
    mean_luma = (x * weights).sum(1).mean((1, 2))
    y = ops.adjust_contrast(x, torch.full((64,), 1.5))
    torch.testing.assert_close((y * weights).sum(1).mean((1, 2)), mean_luma)
    assert (y.std((1, 2, 3)) > x.std((1, 2, 3)) * 1.4).all()
    flat = ops.adjust_contrast(x, torch.zeros(64))
    torch.testing.assert_close(flat, mean_luma.view(-1, 1, 1, 1).expand_as(x))


def test_saturation_zero_is_grayscale_and_one_is_identity():
    x = images()
    zero, one = torch.zeros(64), torch.ones(64)
    torch.testing.assert_close(saturate(x, zero), ops.grayscale(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(saturate(x, one), x, atol=1e-5, rtol=0)


def test_hue_rotation_by_zero_or_a_full_turn_is_identity_and_keeps_luma():
    x = 0.3 + 0.4 * images()  # rotations of these colours stay in gamut
    for turns in (0.0, 1.0):
        torch.testing.assert_close(rotate_hue(x, torch.full((64,), turns)), x, atol=1e-5, rtol=0)
    half = rotate_hue(x, torch.full((64,), 0.5))
    luma = (x * LUMA.view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close((half * LUMA.view(1, 3, 1, 1)).sum(1), luma, atol=1e-5, rtol=0)
    assert changed(half, x).all()
    red = torch.tensor([0.7, 0.3, 0.3]).view(1, 3, 1, 1)  # half a turn makes red cyan-ish
    cyan = rotate_hue(red, torch.tensor([0.5])).flatten()
    assert cyan[0] < 0.5 and cyan[1] > 0.4 and cyan[2] > 0.4


def test_saturation_and_hue_are_no_ops_on_grey_images():
    x, factor = images(channels=1), torch.full((64,), 0.3)
    assert torch.equal(saturate(x, factor), x)
    assert torch.equal(rotate_hue(x, factor), x)
    assert torch.equal(ops.grayscale(x, torch.ones(64, dtype=torch.bool)), x)


# ---- blur, solarize, normalize -----------------------------------------------------------------


def test_blur_keeps_a_constant_image_and_reduces_the_variance_of_noise():
    sigma = torch.linspace(0.5, 2.0, 16)
    constant = torch.full((16, 3, 32, 32), 0.37)
    torch.testing.assert_close(ops.gaussian_blur(constant, sigma, 5), constant)
    noise = torch.rand(16, 3, 32, 32, generator=gen())
    blurred = ops.gaussian_blur(noise, sigma, 5)
    assert (blurred.var((1, 2, 3)) < 0.6 * noise.var((1, 2, 3))).all()
    assert blurred[-1].var() < 0.5 * blurred[0].var()  # larger sigma, smoother
    torch.testing.assert_close(blurred.mean((1, 2, 3)), noise.mean((1, 2, 3)), atol=2e-3, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_blur_equals_a_direct_conv2d_of_each_image(channels):
    x, k = torch.rand(8, channels, 20, 24, generator=gen()), 7
    sigma = torch.linspace(0.1, 2.0, 8)
    y = ops.gaussian_blur(x, sigma, k)
    offset = torch.arange(k) - k // 2
    for i in range(8):
        kernel = torch.exp(-0.5 * (offset / sigma[i]) ** 2)
        kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
        padded = F.pad(x[i : i + 1], (k // 2,) * 4, mode="reflect")
        ref = F.conv2d(padded, kernel.expand(channels, 1, k, k), groups=channels)[0]
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=0)


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_image():
    assert [ops.blur_kernel_size(s) for s in (28, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]


def test_solarize_inverts_only_pixels_at_or_above_one_half():
    x = torch.linspace(0, 1, 101).view(1, 1, 1, 101)
    y = ops.solarize(x)
    bright = x >= 0.5
    torch.testing.assert_close(y[bright], 1 - x[bright])
    torch.testing.assert_close(y[~bright], x[~bright])


def test_normalize_gives_zero_mean_unit_std_per_channel():
    x = images(256)
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    y = ops.normalize(x, mean.tolist(), std.tolist())
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)


# ---- per-sample probabilities ------------------------------------------------------------------

# a view that keeps the whole image (full-size crop, no flip) and runs only the op under test
IDENTITY_VIEW = ViewSpec(
    size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0
)
RANDOM_OPS = {
    "jitter": lambda p: replace(IDENTITY_VIEW, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=p),
    "grayscale": lambda p: replace(IDENTITY_VIEW, grayscale_p=p),
    "blur": lambda p: replace(IDENTITY_VIEW, blur_p=p, blur_sigma=(0.5, 2.0)),
    "solarize": lambda p: replace(IDENTITY_VIEW, solarize_p=p),
}


@pytest.mark.parametrize("name", list(RANDOM_OPS))
def test_probability_decides_which_samples_change(name):
    x = images(400, size=16)
    assert not changed(RANDOM_OPS[name](0.0)(x, gen()), x).any()
    assert changed(RANDOM_OPS[name](1.0)(x, gen()), x).all()
    fraction = changed(RANDOM_OPS[name](0.5)(x, gen()), x).float().mean().item()
    assert 0.42 < fraction < 0.58


def test_view_flip_probability_mirrors_about_that_fraction():
    x = images(400, size=16)
    spec = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0, grayscale_p=0)
    y = spec(x, gen())
    mirrored = (y - x.flip(-1)).flatten(1).abs().amax(1) < 1e-5
    assert not changed(replace(spec, flip_p=0.0)(x, gen()), x).any()
    assert 0.42 < mirrored.float().mean().item() < 0.58 and (mirrored ^ ~changed(y, x)).all()


# ---- BYOL's asymmetric views -------------------------------------------------------------------


def test_byol_blurs_the_first_view_always_and_solarizes_only_the_second():
    views = VIEWS.build({"name": "byol", "size": 32})
    first, second = views.large
    assert (first.blur_p, first.solarize_p) == (1.0, 0.0)
    assert (second.blur_p, second.solarize_p) == (0.1, 0.2)
    # a flat bright image survives crop, jitter-free blur and grey; only solarisation darkens it
    plain = MultiView([replace(v, jitter_p=0.0) for v in views.large], name="byol-test")
    (one, two), _ = plain(torch.full((500, 3, 32, 32), 204, dtype=torch.uint8), gen())
    assert (one > 0).all()
    solarized = (two < 0).flatten(1).all(1).float().mean().item()
    assert 0.14 < solarized < 0.26


def test_byol_first_view_is_blurred_far_more_often_than_the_second():
    x = 0.45 * images(400)  # below the solarisation threshold: only blur can change a sample
    keep = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    first, second = (replace(v, **keep) for v in VIEWS.build({"name": "byol", "size": 32}).large)
    # sigma ~ U(0.1, 2): below ~0.2 a 3-tap blur moves pixels by < 1e-5, hence not all 400
    assert changed(first(x, gen()), x).float().mean() > 0.85
    assert changed(second(x, gen()), x).float().mean() < 0.2


def test_moco_v1_and_simclr_presets_use_the_paper_jitter():
    spec = VIEWS.build({"name": "moco_v1", "size": 32}).large[0]
    assert spec.jitter == (0.4, 0.4, 0.4, 0.4) and spec.jitter_p == 1.0 and spec.scale[0] == 0.2
    assert math.isclose(VIEWS.build({"name": "simclr"}).large[0].jitter[3], 0.2)


@pytest.mark.parametrize(
    "name", ["simclr", "byol", "moco_v1", "moco_v2", "simsiam", "swav", "dino", "crop_flip"]
)
def test_views_of_one_size_evaluate_whole_images_at_image_size(name):
    views = VIEWS.build({"name": name, "size": 16, "image_size": 24})
    x = uint8_images()  # (32, 3, 32, 32)
    large, _ = views(x, gen())
    assert large and all(v.shape[-1] == 16 for v in large)
    expected = ops.normalize(ops.resize(x.float() / 255, 24), views.mean, views.std)
    torch.testing.assert_close(views.eval_transform(x.float() / 255), expected)
    assert views.size == 24  # the run's image size (data.json), what the probes see
