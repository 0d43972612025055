"""Batched image augmentations with per-sample random parameters, on the device of the input.

Images are float (N, C, H, W) in [0, 1] with C = 1 or 3 unless a docstring says otherwise.
Random parameters are drawn from an explicit `Generator` on the generator's device and
moved to the images' device, so a CPU generator drives CUDA images and one seed gives one
result. The ops take per-sample parameters (N,); `ViewSpec` (views.py) draws them, each op
applied to a sample with probability `p`, and a sample that is not selected gets identity
parameters, which keeps the code free of masks and host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Generator, Tensor

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in luma
# RGB -> YIQ; its I and Q rows sum to zero, so grey (r = g = b) has I = Q = 0.
YIQ = torch.tensor([LUMA, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)], dtype=torch.float64)
YIQ, YIQ_INV = YIQ.float(), torch.linalg.inv(YIQ).float()  # float32: MPS has no float64
# linear sRGB -> CIE XYZ under D65 (Lindbloom's sRGB matrix); its row sums are the D65 white
# (0.95047, 1, 1.08883), so (1, 1, 1) maps to a = b = 0 exactly
SRGB_TO_XYZ = torch.tensor(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
# Lab ranges over all sRGB colours (L 0..100, a -86.183..98.233, b -107.857..94.478) mapped to
# [-1, 1]: mean and std of CMC's code (train_CMC.py, get_train_loader)
LAB_MEAN = (50.0, (98.233 - 86.183) / 2, (94.478 - 107.857) / 2)
LAB_STD = (50.0, (98.233 + 86.183) / 2, (94.478 + 107.857) / 2)


def to_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is returned as float32."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def uniform(n: int, low: float, high: float, generator: Generator, device) -> Tensor:
    """(n,) samples of U(low, high) drawn on the generator's device, moved to `device`."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return (u * (high - low) + low).to(device)


def bernoulli(n: int, p: float, generator: Generator, device) -> Tensor:
    """(n,) bool, True with probability p; always drawn, so the stream never depends on p."""
    return (torch.rand(n, generator=generator, device=generator.device) < p).to(device)


def sample_crop_boxes(
    n: int, height: int, width: int, scale: Sequence, ratio: Sequence, generator: Generator
) -> Tensor:
    """(n, 4) int64 boxes (top, left, h, w), torchvision's RandomResizedCrop.get_params batched.

    Area fraction ~ U(scale), aspect w/h log-uniform in ratio; the first of 10 draws that fits
    wins, else the whole image with its aspect clamped into ratio, centred.
    """
    g, dev = generator, generator.device
    u = torch.rand(2, n, 10, generator=g, device=dev)
    area = height * width * (u[0] * (scale[1] - scale[0]) + scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(u[1] * (log_hi - log_lo) + log_lo)
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first fitting attempt
    h, w, found = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], fits.any(1)
    aspect_in = min(max(width / height, ratio[0]), ratio[1])
    h = torch.where(found, h, float(min(height, round(width / aspect_in))))
    w = torch.where(found, w, float(min(width, round(height * aspect_in))))
    u = torch.rand(n, 2, generator=g, device=dev)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), (height - h) // 2)
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), (width - w) // 2)
    return torch.stack([top, left, h, w], 1).long()


def scatter_matrix(index: Tensor, weight: Tensor, in_size: int) -> Tensor:
    """(N, S, in_size) dense matrix from T taps per row: index, weight (N, S, T)."""
    matrix = weight.new_zeros(*index.shape[:2], in_size)
    return matrix.scatter_add_(2, index.clamp(0, in_size - 1), weight)


def interpolation_matrix(
    start: Tensor,
    length: Tensor,
    size: int,
    in_size: int,
    antialias: bool = True,
    flip: Tensor | None = None,
) -> Tensor:
    """(N, size, in_size) weights resampling pixels [start, start + length) (N,) to `size`.

    Triangle filter as PIL and F.interpolate(bilinear, align_corners=False): bilinear when
    enlarging; when shrinking with `antialias` it widens by the scale factor. Taps outside the
    box get no weight and rows are renormalised (bilinear's edge clamping); flip (N,) mirrors.
    """
    start, length = start.float(), length.float()
    step = length / size  # input pixels per output pixel
    support = step.clamp(min=1.0) if antialias else torch.ones_like(step)
    taps = math.ceil(2 * max(1.0, in_size / size if antialias else 1)) + 1  # static: no sync
    out = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    if flip is not None:
        out = torch.where(flip.to(start.device)[:, None], size - out, out)
    centre = torch.addcmul(start[:, None], out, step[:, None])  # (N, size), pixel-edge coords
    first = torch.floor(centre - support[:, None] - 0.5) + 1  # leftmost pixel in the support
    # taps first, (taps, N, size): the per-tap ops and the sum run on contiguous slabs
    index = first + torch.arange(taps, device=start.device, dtype=torch.float32).view(-1, 1, 1)
    weight = (index + 0.5 - centre).abs_().div_(support[:, None]).neg_().add_(1).clamp_(min=0)
    weight *= (index >= start[:, None]) & (index < (start + length)[:, None])
    weight /= weight.sum(0)
    return scatter_matrix(index.long().permute(1, 2, 0), weight.permute(1, 2, 0), in_size)


def separable(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """rows (N, S, H) @ x (N, C, H, W) @ cols (N, T, W)^T -> float (N, C, S, T)."""
    n, c, height, width = x.shape
    if c > 1:  # one bmm over N*C: cheaper than a broadcast matmul, same copy of the small rows
        rows = rows.repeat_interleave(c, 0)
    y = rows.bmm(x.float().reshape(n * c, height, width))  # (N*C, S, W)
    y = y.view(n, c * rows.shape[1], width).bmm(cols.transpose(1, 2))
    return y.view(n, c, rows.shape[1], cols.shape[1])


def resized_crop(
    x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None, gain: Tensor | float = 1.0
) -> Tensor:
    """Crop boxes (N, 4) (top, left, h, w) of x (N, C, H, W) and resize each to (size, size).

    Two batched matmuls with per-sample interpolation matrices: on CPU as fast as affine_grid +
    grid_sample in the whole SimCLR pipeline at 28-32 px (2x slower for 96 -> 64 px crops), but
    exact and antialiased. A flip mirrors the column matrix and a per-sample `gain` (N,) scales
    the row matrix, so flip, brightness and uint8's 1/255 are free. Returns float32.
    """
    n, _, height, width = x.shape
    boxes = boxes.to(x.device).T  # rows and columns in one call: half the small-op overhead
    flip = None if flip is None else torch.cat([torch.zeros_like(flip), flip]).to(x.device)
    both = interpolation_matrix(
        boxes[[0, 1]].flatten(), boxes[[2, 3]].flatten(), size, max(height, width), flip=flip
    )
    rows = both[:n, :, :height] * torch.as_tensor(gain, device=x.device).view(-1, 1, 1)
    return separable(x, rows, both[n:, :, :width])


def resize(x: Tensor, size: int) -> Tensor:
    """The centre square of each image resized to (size, size), float in [0, 1]."""
    n, _, height, width = x.shape
    if height == width == size:
        return to_float(x)
    side = min(height, width)
    box = torch.tensor([(height - side) // 2, (width - side) // 2, side, side], device=x.device)
    gain = 1 / 255 if x.dtype == torch.uint8 else 1.0
    return resized_crop(x, box.expand(n, 4), size, gain=gain)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with each image's mean luma: factor (N,) 0 -> flat grey, 1 -> x; clamped."""
    mean = x.mean((2, 3))  # (N, C); mean luma = luma of the channel means, one cheap reduction
    if x.shape[1] == 3:
        mean = mean @ torch.tensor(LUMA, device=x.device, dtype=x.dtype)
    mean = mean.view(-1)
    return (x * _per_sample(factor)).add_(_per_sample((1 - factor) * mean)).clamp_(0, 1)


def color_matrix(saturation: Tensor, hue: Tensor) -> Tensor:
    """(N, 3, 3) RGB map: scale chroma by saturation (N,), rotate hue by hue (N,) turns.

    In YIQ, luma Y is kept and the chroma (I, Q) is scaled and rotated; scaling chroma by s is
    exactly torchvision's blend s * x + (1 - s) * grey, and the rotation keeps luma unchanged.
    """
    s, angle = saturation.float(), 2 * math.pi * hue.float()
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    chroma = torch.zeros(len(s), 3, 3, device=s.device)
    chroma[:, 0, 0] = 1
    chroma[:, 1, 1], chroma[:, 1, 2], chroma[:, 2, 1], chroma[:, 2, 2] = cos, -sin, sin, cos
    yiq, yiq_inv = YIQ.to(s.device), YIQ_INV.to(s.device)
    return yiq_inv @ chroma @ yiq


def apply_color_matrix(x: Tensor, matrix: Tensor) -> Tensor:
    """Per-pixel RGB map matrix (N, 3, 3) applied to x (N, 3, H, W), clamped; grey: no-op."""
    n, c, height, width = x.shape
    if c == 1:  # saturation and hue do nothing to grey images
        return x
    return matrix.to(x.device).bmm(x.reshape(n, c, -1)).clamp_(0, 1).view(n, c, height, width)


def sample_jitter(
    n: int, strength: Sequence[float], p: float, generator: Generator, device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample (brightness, contrast, saturation, hue) factors, each (N,).

    strength = (b, c, s, h) as in ColorJitter: factors ~ U(max(0, 1 - v), 1 + v), hue ~ U(-h, h);
    samples not selected (probability 1 - p) get the identity (1, 1, 1, 0).
    """
    b, c, s, h = strength
    apply = bernoulli(n, p, generator, device)
    factors = [uniform(n, max(0.0, 1 - v), 1 + v, generator, device) for v in (b, c, s)]
    shift = uniform(n, -h, h, generator, device)
    b, c, s = (torch.where(apply, f, torch.ones_like(f)) for f in factors)
    return b, c, s, torch.where(apply, shift, torch.zeros_like(shift))


def grayscale(x: Tensor, apply: Tensor | None = None) -> Tensor:
    """Replace every channel by the luma where apply (N,) bool (default: all); keeps C."""
    if x.shape[1] == 1:
        return x
    n, c, height, width = x.shape
    grey = torch.tensor(LUMA, device=x.device, dtype=x.dtype).expand(3, 3)
    if apply is None:
        return (grey @ x.reshape(n, c, -1)).view_as(x)
    # a per-sample 3x3 (grey or identity) in one bmm beats luma + torch.where by 2-3x
    matrix = torch.where(apply.to(x.device)[:, None, None], grey, torch.eye(3, device=x.device))
    return matrix.bmm(x.reshape(n, c, -1)).view_as(x)


def blur_kernel_size(size: int) -> int:
    """Odd kernel of about 10% of the image side (SimCLR appendix A), at least 3."""
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


def blur_matrix(sigma: Tensor, kernel_size: int, size: int) -> Tensor:
    """(N, size, size) Gaussian blur along one axis, per-sample sigma (N,) (0: identity).

    Reflect padding as torchvision. As matrices for `separable`, measured as fast as grouped
    conv2d at 224 px (k = 23) and twice as fast at 32 px.
    """
    radius = kernel_size // 2
    offset = torch.arange(-radius, radius + 1, device=sigma.device)
    kernel = torch.exp(-0.5 * (offset / sigma.float().clamp(min=1e-6)[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, k)
    index = (torch.arange(size, device=sigma.device)[:, None] + offset).abs()  # reflect at 0
    index = torch.where(index > size - 1, 2 * (size - 1) - index, index)  # and at size - 1
    n = len(sigma)
    return scatter_matrix(index.expand(n, size, -1), kernel[:, None, :].expand(n, size, -1), size)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur of x (N, C, H, W) with per-sample sigma (N,), reflect padding."""
    sigma = sigma.to(x.device)
    rows = blur_matrix(sigma, kernel_size, x.shape[2])
    cols = rows if x.shape[2] == x.shape[3] else blur_matrix(sigma, kernel_size, x.shape[3])
    return separable(x, rows, cols)


def solarize(x: Tensor, apply: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """Invert (1 - x) the pixels >= threshold of the samples where apply (N,) bool (default: all).

    As x - change with change = 2x - 1 on inverted pixels: arithmetic is ~3x faster on CPU than
    torch.where with a full-size bool mask.
    """
    change = (x * 2 - 1).relu_() if threshold == 0.5 else (x * 2 - 1).mul_(x >= threshold)
    if apply is not None:
        change.mul_(_per_sample(apply.to(x.device, x.dtype)))
    return x - change


def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB x (N, 3, H, W) in [0, 1] -> CIE L*a*b* (D65): L in [0, 100], a and b about ±100.

    sRGB gamma undone (IEC 61966-2-1), linear RGB -> XYZ, each axis divided by the white, then
    L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)), b = 200 (f(Y) - f(Z)) with f(t) = t^(1/3) above
    (6/29)^3 and its tangent line t / (3 (6/29)^2) + 4/29 below (CIE 15). skimage's rgb2lab, which
    CMC's code uses, computes the same up to the matrix's last digits.
    """
    n, c, height, width = x.shape
    if c != 3:
        raise ValueError(f"Lab needs 3-channel RGB images, got {c} channel(s)")
    x = x.float()
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    matrix = SRGB_TO_XYZ.to(x.device)
    xyz = (matrix @ linear.reshape(n, 3, -1)) / matrix.sum(1, keepdim=True)  # / white
    delta = 6 / 29
    f = torch.where(
        xyz > delta**3, xyz.clamp(min=delta**3) ** (1 / 3), xyz / (3 * delta**2) + 4 / 29
    )
    fx, fy, fz = f.unbind(1)
    lab = torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)
    return lab.view(n, 3, height, width)


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """(x - mean) / std per channel (lists of length C, or 1 for all channels)."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    scale = 1 / torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * scale).add_(-mean * scale)  # one multiply-add, faster than addcmul on CPU
