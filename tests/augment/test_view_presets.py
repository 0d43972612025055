"""Each view preset samples its paper's augmentation parameters.

The paper's numbers are written out once below (PAPER) with their source. Each preset's views
are then run on a batch with the samplers in `selfsup.augment.ops` wrapped, so the tests see the
parameters the views really drew (crop arguments, jitter factors, grayscale / solarise masks,
blur sigmas, flips) and check their ranges and frequencies. Crop areas depend on the image size,
so they are drawn at 224 x 224 with the arguments the view passed to the crop sampler.
test_augment.py checks the ops themselves; it also already pins a few spec fields (BYOL's blur
and solarise per view, MoCo v1's jitter) that appear here only through the sampled values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch

from selfsup.augment import ops
from selfsup.registry import VIEWS

N = 4000  # samples per view: a frequency p is within 4.5 sqrt(p(1 - p) / N) of p
CROP_N = 20000  # crop boxes drawn at 224 x 224 per view


@dataclass(frozen=True)
class Paper:
    """One view's parameters as its paper gives them (all presets: flip 0.5, blur sigma 0.1-2)."""

    scale: tuple[float, float]  # crop area fraction
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    jitter_p: float
    blur_p: float
    solarize_p: float = 0.0
    grayscale_p: float = 0.2
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    size: int = 224


SIMCLR_COLOUR = (0.8, 0.8, 0.8, 0.2)  # colour distortion strength s = 1: (0.8s, 0.8s, 0.8s, 0.2s)
BYOL_COLOUR = (0.4, 0.4, 0.2, 0.1)

PAPER: dict[str, tuple[list[Paper], list[Paper]]] = {  # preset: (large views, small views)
    # SimCLR (Chen et al. 2020), App. A: crop area U(0.08, 1), aspect 3/4..4/3; colour jitter of
    # strength s with p 0.8, grayscale 0.2; Gaussian blur p 0.5, sigma in [0.1, 2.0].
    "simclr": ([Paper((0.08, 1.0), SIMCLR_COLOUR, 0.8, blur_p=0.5)] * 2, []),
    # MoCo v1 (He et al. 2020), §4 "Implementation" and its reference code (main_moco.py):
    # RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.4) always, grayscale 0.2.
    "moco_v1": ([Paper((0.2, 1.0), (0.4, 0.4, 0.4, 0.4), 1.0, blur_p=0.0)] * 2, []),
    # MoCo v2 (Chen et al. 2020, "Improved Baselines"), §2 and its code (--aug-plus): crop
    # (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur p 0.5.
    # SimSiam (Chen & He 2021), §4 / App. A, uses the same augmentation.
    "moco_v2": ([Paper((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, blur_p=0.5)] * 2, []),
    # BYOL (Grill et al. 2020), App. B, Table 6: crop (0.08, 1), jitter (0.4, 0.4, 0.2, 0.1) p 0.8,
    # grayscale 0.2; blur 1.0 / 0.1 and solarisation 0.0 / 0.2 for the two views.
    "byol": (
        [
            Paper((0.08, 1.0), BYOL_COLOUR, 0.8, blur_p=1.0, solarize_p=0.0),
            Paper((0.08, 1.0), BYOL_COLOUR, 0.8, blur_p=0.1, solarize_p=0.2),
        ],
        [],
    ),
    # SwAV (Caron et al. 2020), §4 / App. A and its code (main_swav.py): multi-crop 2 x 224 px
    # at (0.14, 1) + 6 x 96 px at (0.05, 0.14); SimCLR's colour distortion (s = 1), blur p 0.5.
    "swav": (
        [Paper((0.14, 1.0), SIMCLR_COLOUR, 0.8, blur_p=0.5)] * 2,
        [Paper((0.05, 0.14), SIMCLR_COLOUR, 0.8, blur_p=0.5, size=96)] * 6,
    ),
    # DINO (Caron et al. 2021), App. and its code (DataAugmentationDINO): global crops (0.4, 1)
    # with BYOL's colour and blur 1.0 / 0.1, solarisation 0.0 / 0.2; 8 local 96 px crops at
    # (0.05, 0.4), blur p 0.5, no solarisation.
    "dino": (
        [
            Paper((0.4, 1.0), BYOL_COLOUR, 0.8, blur_p=1.0, solarize_p=0.0),
            Paper((0.4, 1.0), BYOL_COLOUR, 0.8, blur_p=0.1, solarize_p=0.2),
        ],
        [Paper((0.05, 0.4), BYOL_COLOUR, 0.8, blur_p=0.5, size=96)] * 8,
    ),
}

CASES = [
    (name, group, index)
    for name, (large, small) in PAPER.items()
    for group, views in (("large", large), ("small", small))
    for index in range(len(views))
]
IDS = [f"{name}-{group}{index}" for name, group, index in CASES]


def paper(name: str, group: str, index: int) -> Paper:
    large, small = PAPER[name]
    return (large if group == "large" else small)[index]


@functools.cache
def sampled(name: str) -> dict[tuple[str, int], dict]:
    """What each view of preset `name` drew on N colour images: {(group, index): records}."""
    views = VIEWS.build({"name": name, "size": 16})  # small outputs: fast; sizes do not matter
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, 3, 24, 24), dtype=torch.uint8, generator=generator)
    seen: dict = {}
    spied = ("sample_crop_boxes", "sample_jitter", "resized_crop")
    real = {key: getattr(ops, key) for key in (*spied, "grayscale", "gaussian_blur", "solarize")}

    def sample_crop_boxes(n, height, width, scale, ratio, generator):
        seen["crop"] = dict(n=n, height=height, width=width, scale=scale, ratio=ratio)
        return real["sample_crop_boxes"](n, height, width, scale, ratio, generator)

    def sample_jitter(n, strength, p, generator, device):
        factors = real["sample_jitter"](n, strength, p, generator, device)
        seen["jitter"] = dict(strength=strength, p=p, factors=torch.stack(factors, 1))
        return factors

    def resized_crop(x, boxes, size, flip=None, gain=1.0):
        seen["resize"] = dict(size=size, flip=flip)
        return real["resized_crop"](x, boxes, size, flip, gain)

    def grayscale(x, apply=None):
        seen["grayscale"] = apply
        return real["grayscale"](x, apply)

    def gaussian_blur(x, sigma, kernel_size):
        seen["blur"] = sigma  # 0 where the sample is not blurred
        return real["gaussian_blur"](x, sigma, kernel_size)

    def solarize(x, apply=None, threshold=0.5):
        seen["solarize"] = dict(apply=apply, threshold=threshold)
        return real["solarize"](x, apply, threshold)

    records = {}
    with pytest.MonkeyPatch.context() as patch:
        # ViewSpec.__call__ calls all six as ops.<name>, so patching the module catches them
        spies = (sample_crop_boxes, sample_jitter, resized_crop, grayscale, gaussian_blur, solarize)
        for spy in spies:
            patch.setattr(ops, spy.__name__, spy)
        for group, specs in (("large", views.large), ("small", views.small)):
            for index, spec in enumerate(specs):
                seen = {}
                spec(x, generator)
                records[group, index] = seen
    return records


def check_frequency(applied: torch.Tensor | None, p: float, what: str) -> None:
    """The share of True in `applied` (None: the op never ran) is p, exactly when p is 0 or 1."""
    fraction = 0.0 if applied is None else applied.float().mean().item()
    tolerance = 4.5 * math.sqrt(p * (1 - p) / N)
    assert abs(fraction - p) <= tolerance, f"{what}: applied to {fraction:.3f}, paper p = {p}"


def check_covers(values: torch.Tensor, low: float, high: float, what: str) -> None:
    """values lie in [low, high] and reach both ends (within 2 % of the width)."""
    width = high - low
    assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6, f"{what} outside range"
    assert values.min() <= low + 0.02 * width and values.max() >= high - 0.02 * width, what


def test_presets_build_the_papers_number_and_size_of_views():
    for name, (large, small) in PAPER.items():
        views = VIEWS.build({"name": name})  # defaults: 224 px large views
        assert [v.size for v in views.large] == [p.size for p in large], name
        assert [v.size for v in views.small] == [p.size for p in small], name  # 96 at 224
    simsiam, moco_v2 = VIEWS.build({"name": "simsiam"}), VIEWS.build({"name": "moco_v2"})
    assert simsiam.large == moco_v2.large and simsiam.small == []


@pytest.mark.parametrize(("name", "group", "index"), CASES, ids=IDS)
def test_presets_sample_crop_areas_in_each_papers_scale_range(name, group, index):
    expected, crop = paper(name, group, index), sampled(name)[group, index]["crop"]
    assert (crop["n"], crop["height"], crop["width"]) == (N, 24, 24)
    assert crop["scale"] == pytest.approx(expected.scale)
    # the same sampler with the arguments the view passed, at ImageNet's 224 x 224
    generator = torch.Generator().manual_seed(1)
    boxes = ops.sample_crop_boxes(CROP_N, 224, 224, crop["scale"], crop["ratio"], generator)
    area = boxes[:, 2].double() * boxes[:, 3] / 224**2
    low, high = expected.scale
    # sides are rounded to whole pixels: the smallest crops (5 % of 224^2) move by < 3 %
    assert area.min() >= 0.97 * low and area.max() <= 1.03 * high
    assert area.min() <= 1.03 * low + 0.01 * (high - low), "the lower end is not reached"
    assert area.max() >= 0.97 * high - 0.01 * (high - low), "the upper end is not reached"
    if high <= 9 / 16:  # every aspect in 3/4..4/3 fits: no rejection, so area ~ U(low, high)
        assert area.mean().item() == pytest.approx((low + high) / 2, rel=0.02)


@pytest.mark.parametrize(("name", "group", "index"), CASES, ids=IDS)
def test_presets_sample_crop_aspect_ratios_in_3_4_to_4_3(name, group, index):
    expected, crop = paper(name, group, index), sampled(name)[group, index]["crop"]
    assert crop["ratio"] == pytest.approx(expected.ratio)
    generator = torch.Generator().manual_seed(2)
    boxes = ops.sample_crop_boxes(CROP_N, 224, 224, crop["scale"], crop["ratio"], generator)
    aspect = boxes[:, 3].double() / boxes[:, 2]  # w / h
    assert aspect.min() >= 0.97 * 3 / 4 and aspect.max() <= 1.03 * 4 / 3
    assert aspect.min() <= 1.03 * 3 / 4 and aspect.max() >= 0.97 * 4 / 3
    # log-uniform: as many crops wider than square as taller
    assert (aspect > 1).float().mean().item() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(("name", "group", "index"), CASES, ids=IDS)
def test_presets_sample_jitter_factors_in_each_papers_ranges_with_its_probability(
    name, group, index
):
    expected, jitter = paper(name, group, index), sampled(name)[group, index]["jitter"]
    assert jitter["strength"] == pytest.approx(expected.jitter)
    factors = jitter["factors"]  # (N, 4): brightness, contrast, saturation factors, hue shift
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    applied = (factors != identity).any(1)
    check_frequency(applied, expected.jitter_p, "colour jitter")
    b, c, s, h = expected.jitter  # ColorJitter: factor ~ U(max(0, 1 - v), 1 + v), hue ~ U(-h, h)
    bounds = [(max(0.0, 1 - v), 1 + v) for v in (b, c, s)] + [(-h, h)]
    for column, (low, high), what in zip(
        factors[applied].T, bounds, ("brightness", "contrast", "saturation", "hue"), strict=True
    ):
        check_covers(column, low, high, what)
        assert column.mean().item() == pytest.approx((low + high) / 2, abs=0.03 * (high - low))


@pytest.mark.parametrize(("name", "group", "index"), CASES, ids=IDS)
def test_presets_turn_a_fifth_of_the_samples_grey(name, group, index):
    expected = paper(name, group, index)
    check_frequency(sampled(name)[group, index].get("grayscale"), expected.grayscale_p, "grey")


@pytest.mark.parametrize(("name", "group", "index"), CASES, ids=IDS)
def test_presets_blur_with_each_papers_probability_and_sigma_in_0_1_to_2(name, group, index):
    expected, sigma = paper(name, group, index), sampled(name)[group, index].get("blur")
    applied = None if sigma is None else sigma > 0
    check_frequency(applied, expected.blur_p, "Gaussian blur")
    if expected.blur_p > 0:
        check_covers(sigma[applied], *expected.blur_sigma, "blur sigma")


@pytest.mark.parametrize(("name", "group", "index"), CASES, ids=IDS)
def test_presets_solarize_with_each_papers_probability_at_threshold_one_half(name, group, index):
    expected, solarize = paper(name, group, index), sampled(name)[group, index].get("solarize")
    check_frequency(solarize and solarize["apply"], expected.solarize_p, "solarisation")
    if solarize is not None:
        assert solarize["threshold"] == 0.5  # BYOL Table 6: x if x < 0.5 else 1 - x


@pytest.mark.parametrize(("name", "group", "index"), CASES, ids=IDS)
def test_presets_flip_half_of_the_samples(name, group, index):
    expected, resize = paper(name, group, index), sampled(name)[group, index]["resize"]
    check_frequency(resize["flip"], expected.flip_p, "horizontal flip")
