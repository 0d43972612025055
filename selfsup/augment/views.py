"""View recipes: `ViewSpec` (one view), `MultiView` (large + small views) and the paper presets.

Each view runs, in the papers' order: random resized crop + horizontal flip, colour jitter
(brightness, contrast, saturation, hue in this fixed order; torchvision shuffles it per image),
random grayscale, Gaussian blur, solarisation; `MultiView` then normalises. MoCo v1 greys
before jittering; since jitter's saturation and hue are no-ops on grey and brightness and
contrast commute with luma, this order differs from it only through clamping. With
`color_space: lab` (CMC) the views are converted to CIE Lab before the normalisation, which then
uses Lab's fixed ranges instead of the data's RGB statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from selfsup.augment import ops
from selfsup.registry import VIEWS

PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")
COLOR_SPACES = ("rgb", "lab")  # rgb: the data's own channels (grey stays grey)


@dataclass(frozen=True)
class ViewSpec:
    """One view's recipe; probabilities are per sample. size None keeps the input's side."""

    size: int | None = 224
    scale: tuple[float, float] = (0.08, 1.0)  # crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect w / h, log-uniform
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness..hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    random_crop: bool = True  # False: the centre square, resized (deterministic)
    # with size None: the input's side times this (multi-crop's small views of images whose size
    # the data decides: 96/224 of it, as 96 px at 224)
    relative_size: float = 1.0

    def __post_init__(self) -> None:
        for key in ("scale", "ratio", "jitter", "blur_sigma"):  # YAML gives lists
            object.__setattr__(self, key, tuple(float(v) for v in getattr(self, key)))
        probabilities = {k: getattr(self, k) for k in PROBABILITIES}
        bad = [f"{k}={p} (need 0..1)" for k, p in probabilities.items() if not 0 <= p <= 1]
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            bad.append(f"scale={self.scale} (need 0 < min <= max <= 1)")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            bad.append(f"ratio={self.ratio} (need 0 < min <= max)")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            bad.append(f"jitter={self.jitter} (need 4 values >= 0, hue <= 0.5)")
        if bad:
            raise ValueError(f"invalid view: {', '.join(bad)}")

    def __call__(
        self,
        x: Tensor,
        generator: torch.Generator,
        gain: float | None = None,
        share: tuple[int, int] = (0, 1),
    ) -> Tensor:
        """x (N, C, H, W) uint8, or float that `gain` scales to [0, 1] -> (N, C, s, s) in [0, 1].

        share (rank, world): x is part `rank` of `world` equal parts of one batch; the random
        parameters are drawn for the whole batch and this part's rows kept, so that the views of
        every part equal the rows of the views of the whole batch (training on several processes).
        """
        n, _, height, width = x.shape
        rank, world = share
        total, rows = n * world, slice(rank * n, (rank + 1) * n)
        device, size = x.device, self.size or max(round(height * self.relative_size), 1)
        if gain is None:
            gain = 1 / 255 if x.dtype == torch.uint8 else 1.0
        if self.random_crop:
            boxes = ops.sample_crop_boxes(total, height, width, self.scale, self.ratio, generator)
            boxes = boxes[rows]
        else:
            side = min(height, width)
            boxes = torch.tensor([(height - side) // 2, (width - side) // 2, side, side])
            boxes = boxes.expand(n, 4)
        flip = (
            ops.bernoulli(total, self.flip_p, generator, device)[rows] if self.flip_p > 0 else None
        )
        if self.jitter_p > 0:
            factors = ops.sample_jitter(total, self.jitter, self.jitter_p, generator, device)
            factors = tuple(f[rows] for f in factors)
            gain = factors[0] * gain  # brightness is a per-pixel scale: fold it into the crop
        y = ops.resized_crop(x, boxes, size, flip, gain).clamp_(0, 1)
        if self.jitter_p > 0:
            y = ops.adjust_contrast(y, factors[1])
            y = ops.apply_color_matrix(y, ops.color_matrix(factors[2], factors[3]))
        if self.grayscale_p > 0:
            y = ops.grayscale(y, ops.bernoulli(total, self.grayscale_p, generator, device)[rows])
        if self.blur_p > 0:
            apply = ops.bernoulli(total, self.blur_p, generator, device)[rows]
            sigma = ops.uniform(total, *self.blur_sigma, generator, device)[rows]
            sigma = torch.where(apply, sigma, torch.zeros_like(sigma))
            y = ops.gaussian_blur(y, sigma, ops.blur_kernel_size(y.shape[-1]))
        if self.solarize_p > 0:
            y = ops.solarize(y, ops.bernoulli(total, self.solarize_p, generator, device)[rows])
        return y

    def describe(self) -> str:
        """One log line: size, crop and each op that can happen (p > 0)."""
        parts = [f"size={self.size}", f"scale={self.scale}" if self.random_crop else "centre"]
        parts += [f"{k}={getattr(self, k)}" for k in PROBABILITIES if getattr(self, k) > 0]
        return " ".join(parts + ([f"jitter={self.jitter}"] if self.jitter_p > 0 else []))


@dataclass
class MultiView:
    """Large (global) and small (multi-crop) views of a uint8 batch, normalised.

    `mean`/`std` are per channel (set by the engine from the data, 0.5/0.5 before).
    `color_space` "lab" converts training views and evaluation images to CIE Lab and normalises
    them with Lab's fixed ranges (ops.LAB_MEAN / LAB_STD, as CMC's code); `mean`/`std` are then
    unused. Lab needs colour images: 1-channel data raises a ValueError.
    """

    large: list[ViewSpec]
    small: list[ViewSpec] = field(default_factory=list)
    name: str = ""
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    color_space: str = "rgb"
    # the side of whole images where every view is smaller (EMP-SSL's patches); None: the large
    # views' side
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.color_space not in COLOR_SPACES:
            raise ValueError(
                f"views.color_space must be one of {', '.join(COLOR_SPACES)}, "
                f"not '{self.color_space}'"
            )

    @property
    def size(self) -> int | None:
        """Side of whole images: the evaluation input and the run's image size. The large views'
        side unless `image_size` is set (None: the input's side)."""
        return self.image_size or self.large[0].size

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"need one mean and one positive std per channel, got {mean}, {std}")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(
        self, x: Tensor, generator: torch.Generator, share: tuple[int, int] = (0, 1)
    ) -> tuple[list[Tensor], list[Tensor]]:
        """x uint8 (N, C, H, W) -> (large views, small views), each float (N, C, s, s).

        share (rank, world): x is one process's part of the global batch (ViewSpec.__call__).
        """
        gain = 1 / 255 if x.dtype == torch.uint8 else 1.0  # rides in each view's crop matrix
        x = x.float()  # converted once for all views
        large = [self._finish(spec(x, generator, gain, share)) for spec in self.large]
        small = [self._finish(spec(x, generator, gain, share)) for spec in self.small]
        return large, small

    def eval_transform(self, x: Tensor) -> Tensor:
        """Deterministic evaluation input: centre square resized to `size`, normalised."""
        return self._finish(ops.resize(x, self.size or x.shape[-1]))

    def _finish(self, y: Tensor) -> Tensor:
        if self.color_space == "lab":
            if y.shape[1] != 3:
                raise ValueError(
                    f"views.color_space=lab needs colour (3-channel) images, these have "
                    f"{y.shape[1]}; use color_space=rgb for grayscale data"
                )
            return ops.normalize(ops.rgb_to_lab(y), ops.LAB_MEAN, ops.LAB_STD)
        if len(self.mean) not in (1, y.shape[1]):
            raise ValueError(f"set_stats gave {len(self.mean)} channels, images have {y.shape[1]}")
        return ops.normalize(y, self.mean, self.std)

    @property
    def spec(self) -> dict:
        """Plain data for logs: name, the ViewSpec fields of each view, mean, std, colour space."""
        views = {"large": [asdict(v) for v in self.large], "small": [asdict(v) for v in self.small]}
        whole = {"image_size": self.image_size} if self.image_size else {}
        return {"name": self.name, **views, "mean": self.mean, "std": self.std,
                "color_space": self.color_space, **whole}  # fmt: skip

    def describe(self) -> str:
        lines = [f"views {self.name}: {len(self.large)} large + {len(self.small)} small"]
        if self.color_space != "rgb":
            lines[0] += f", in {self.color_space}"
        if self.image_size:
            lines[0] += f", of {self.image_size}-px images"
        lines += [f"  large {i}: {v.describe()}" for i, v in enumerate(self.large)]
        lines += [f"  small {i}: {v.describe()}" for i, v in enumerate(self.small)]
        return "\n".join(lines)


def _per_view(value: float | Sequence[float], index: int) -> float:
    """A number shared by all views, or one per view (cycled), e.g. BYOL's blur_p=(1.0, 0.1)."""
    return float(value) if isinstance(value, (int, float)) else float(value[index % len(value)])


def _specs(num_views: int, **params) -> list[ViewSpec]:
    """num_views ViewSpecs from a preset's parameters (presets pass their locals())."""
    fields = {k: v for k, v in params.items() if k in ViewSpec.__dataclass_fields__}
    per_view = [k for k in ("blur_p", "solarize_p") if k in fields]
    return [
        ViewSpec(**{**fields, **{k: _per_view(fields[k], i) for k in per_view}})
        for i in range(num_views)
    ]


SMALL_FRACTION = 96 / 224  # multi-crop's small views: 96 px at 224


def _small_size(size: int | None, small_size: int | None) -> int | None:
    return small_size or (None if size is None else round(size * SMALL_FRACTION))


@VIEWS.register("simclr")
def simclr(
    size: int | None = 224,
    scale: Sequence[float] = (0.08, 1.0),
    strength: float = 1.0,
    jitter: Sequence[float] | None = None,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float | Sequence[float] = 0.5,
    solarize_p: float | Sequence[float] = 0.0,
    flip_p: float = 0.5,
    num_views: int = 2,
    image_size: int | None = None,
) -> MultiView:
    """SimCLR (Chen et al. 2020, App. A): colour distortion strength s -> (0.8s, 0.8s, 0.8s, 0.2s).

    Blur is for ImageNet; the CIFAR recipes set blur_p=0. `image_size`: the side of whole
    images (evaluation, the run's image size) when it differs from the views' `size`.
    """
    jitter = jitter or (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    return MultiView(_specs(**locals()), name="simclr", image_size=image_size)


@VIEWS.register("moco_v1")
def moco_v1(
    size: int | None = 224,
    scale: Sequence[float] = (0.2, 1.0),
    jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.4),
    jitter_p: float = 1.0,
    grayscale_p: float = 0.2,
    blur_p: float | Sequence[float] = 0.0,
    solarize_p: float | Sequence[float] = 0.0,
    flip_p: float = 0.5,
    num_views: int = 2,
    image_size: int | None = None,
) -> MultiView:
    """MoCo v1 (He et al. 2019): crop (0.2, 1), grayscale 0.2, ColorJitter(0.4 x 4) always, flip.

    `image_size`: the side of whole images (evaluation) when it differs from the views' `size`."""
    return MultiView(_specs(**locals()), name="moco_v1", image_size=image_size)


@VIEWS.register("moco_v2")
@VIEWS.register("simsiam")
def moco_v2(
    size: int | None = 224,
    scale: Sequence[float] = (0.2, 1.0),
    jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float | Sequence[float] = 0.5,
    solarize_p: float | Sequence[float] = 0.0,
    flip_p: float = 0.5,
    num_views: int = 2,
    image_size: int | None = None,
) -> MultiView:
    """MoCo v2 (Chen et al. 2020): v1's crop + SimCLR-style jitter p 0.8, grayscale, blur 0.5.

    Registered as `simsiam` too: SimSiam (Chen & He 2020) uses exactly this augmentation.
    `image_size`: the side of whole images (evaluation) when it differs from the views' `size`.
    """
    return MultiView(_specs(**locals()), name="moco_v2", image_size=image_size)


@VIEWS.register("byol")
def byol(
    size: int | None = 224,
    scale: Sequence[float] = (0.08, 1.0),
    jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float | Sequence[float] = (1.0, 0.1),
    solarize_p: float | Sequence[float] = (0.0, 0.2),
    flip_p: float = 0.5,
    num_views: int = 2,
    image_size: int | None = None,
) -> MultiView:
    """BYOL (Grill et al. 2020, Table 6): asymmetric views, blur 1.0 / 0.1, solarize 0 / 0.2.
    `image_size`: the side of whole images (evaluation) when it differs from the views' `size`."""
    return MultiView(_specs(**locals()), name="byol", image_size=image_size)


@VIEWS.register("swav")
def swav(
    size: int | None = 224,
    scale: Sequence[float] = (0.14, 1.0),
    num_small: int = 6,
    small_size: int | None = None,
    small_scale: Sequence[float] = (0.05, 0.14),
    strength: float = 1.0,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    num_views: int = 2,
    image_size: int | None = None,
) -> MultiView:
    """SwAV multi-crop (Caron et al. 2020): 2 x 224 (0.14, 1) + 6 x 96 (0.05, 0.14), s = 1.

    small_size None scales 96 with size (96 at 224). `image_size`: the side of whole images
    (evaluation) when it differs from the views' `size`.
    """
    colour = dict(
        jitter=(0.8 * strength,) * 3 + (0.2 * strength,), jitter_p=jitter_p, grayscale_p=grayscale_p
    )
    large = _specs(num_views, blur_p=blur_p, size=size, scale=scale, **colour)
    small_size = _small_size(size, small_size)
    small = _specs(
        num_small, blur_p=blur_p, size=small_size, scale=small_scale,
        relative_size=SMALL_FRACTION, **colour,
    )  # fmt: skip
    return MultiView(large, small, name="swav", image_size=image_size)


@VIEWS.register("dino")
def dino(
    size: int | None = 224,
    scale: Sequence[float] = (0.4, 1.0),
    num_small: int = 8,
    small_size: int | None = None,
    small_scale: Sequence[float] = (0.05, 0.4),
    jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float | Sequence[float] = (1.0, 0.1),
    solarize_p: float | Sequence[float] = (0.0, 0.2),
    small_blur_p: float = 0.5,
    image_size: int | None = None,
) -> MultiView:
    """DINO multi-crop (Caron et al. 2021): BYOL's two global views + num_small local views.

    Global blur 1.0 / 0.1 and solarize 0 / 0.2; local 96 px (scaled with size), blur 0.5.
    Small images (28 px) leave the blur out: blur_p=0, small_blur_p=0. `image_size`: the side
    of whole images (evaluation) when it differs from the global views' `size`.
    """
    colour = dict(jitter=jitter, jitter_p=jitter_p, grayscale_p=grayscale_p)
    large = _specs(2, blur_p=blur_p, solarize_p=solarize_p, size=size, scale=scale, **colour)
    small_size = _small_size(size, small_size)
    small = _specs(
        num_small, blur_p=small_blur_p, size=small_size, scale=small_scale,
        relative_size=SMALL_FRACTION, **colour,
    )  # fmt: skip
    return MultiView(large, small, name="dino", image_size=image_size)


@VIEWS.register("emp_ssl")
def emp_ssl(
    size: int | None = 224,
    num_views: int = 20,
    patch_size: int | None = None,
    scale: Sequence[float] = (0.25, 0.25),
    ratio: Sequence[float] = (1.0, 1.0),
    jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.2),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.1,
    solarize_p: float = 0.1,
    flip_p: float = 0.5,
) -> MultiView:
    """EMP-SSL's patches (Tong et al. 2023, arXiv 2304.03977 §3; code dataset/aug.py):
    num_views (n) fixed-size patches per image, each a random crop of a quarter of the image's
    area (scale (0.25, 0.25), square: RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1)))
    resized to `patch_size` (None: the whole image's side, as the code), flipped, jittered
    (0.4, 0.4, 0.4, 0.2) with p 0.8, greyed with p 0.2, blurred (σ 0.1..2) with p 0.1 and
    solarised with p 0.1, each patch on its own. The code's ImageNet patches (aug4img.py) keep
    RandomResizedCrop's aspect range (ratio (3/4, 4/3)) at 224 px, bicubic.

    `size` is the side of whole images (evaluation, the run's image size); a smaller
    `patch_size` (e.g. 14 px patches of 28 px images: no resizing at all) trains on the patches at
    their own resolution, and needs `size` given.
    """
    if patch_size is not None and size is None:
        raise ValueError(
            "views.patch_size needs views.size, the side of whole images (e.g. size=28 with "
            "patch_size=14)"
        )
    patches = _specs(
        num_views, size=patch_size or size, scale=scale, ratio=ratio, jitter=jitter,
        jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur_p, solarize_p=solarize_p,
        flip_p=flip_p,
    )  # fmt: skip
    return MultiView(patches, name="emp_ssl", image_size=size if patch_size else None)


@VIEWS.register("crop_flip")
def crop_flip(
    size: int | None = 224,
    scale: Sequence[float] = (0.08, 1.0),
    flip_p: float = 0.5,
    num_views: int = 1,
    image_size: int | None = None,
) -> MultiView:
    """Supervised training and fine-tuning: random resized crop and flip only (the standard
    ImageNet training augmentation; SimCLR fine-tunes with it, App. B.5). `image_size`: the side
    of whole images (evaluation) when it differs from the views' `size`."""
    spec = ViewSpec(size=size, scale=tuple(scale), flip_p=flip_p, jitter_p=0.0, grayscale_p=0.0)
    return MultiView([spec] * num_views, name="crop_flip", image_size=image_size)


@VIEWS.register("cmc")
def cmc(
    size: int | None = 224,
    scale: Sequence[float] = (0.2, 1.0),
    flip_p: float = 0.5,
    jitter: Sequence[float] = (0.4, 0.4, 0.0, 0.0),
    jitter_p: float = 0.0,
    num_views: int = 1,
    color_space: str = "lab",
) -> MultiView:
    """CMC (Tian et al. 2019; train_CMC.py): RandomResizedCrop (area 0.2..1, the code's
    --crop_low; its ResNets on ImageNet use 0.08) + flip, then Lab; no colour jitter.

    One crop: the method splits its channels into the L and ab views. Grayscale data has no ab:
    num_views=2, color_space=rgb gives two independent crops (one per encoder), and jitter_p > 0
    adds brightness/contrast jitter (saturation and hue do nothing on grey) so that two crops
    cannot be matched by their intensity histogram alone.
    """
    spec = ViewSpec(
        size=size, scale=tuple(scale), flip_p=flip_p, jitter=tuple(jitter), jitter_p=jitter_p,
        grayscale_p=0.0,
    )  # fmt: skip
    return MultiView([spec] * num_views, name="cmc", color_space=color_space)


@VIEWS.register("none")
def none(size: int | None = None, num_views: int = 2) -> MultiView:
    """No augmentation: num_views identical views, centre square resized to size, normalised."""
    spec = ViewSpec(size=size, random_crop=False, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    return MultiView([spec] * num_views, name="none")
