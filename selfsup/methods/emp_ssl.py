"""EMP-SSL: extreme-multi-patch self-supervised learning (Tong, Chen, Ma & LeCun 2023, arXiv
2304.03977; official code github.com/tsb0601/EMP-SSL).

Many small patches per image instead of two large views: each image gives n fixed-size patches
(the `emp_ssl` view preset: random crops of a quarter of the image, each with its own colour
augmentation), all of them one batch through the backbone and a 3-layer projector, L2-normalised
to z. The loss is the negated objective of §3 (`losses.emp_ssl_terms`):
    L = −1/n Σ_i R(Z_i) − λ · 1/n Σ_i D(Z_i, Z̄)
R, the total coding rate of the b embeddings of patch index i (`losses.total_coding_rate`), keeps
the batch's embeddings spread over many directions (no collapse); D, the mean cosine similarity of
each patch embedding to the mean embedding of its image's n patches, makes the patches of an
image agree. No negatives, predictor, EMA target or stop-gradient; many patches per image is what
lets it converge in about one epoch (§4). R is over the global batch: the embeddings of every
process are gathered with their gradient (`views.global_batch.gather`), as the code computes it
on the batch that DataParallel gathers.

The representation is a bag of features (§3; code evaluate.py, after Chen et al. 2022, arXiv
2206.08954): an image's embedding is the mean of its patches' features. `BagOfFeatures` cuts a
fixed grid of patches of the training geometry from each whole image, so evaluation is
deterministic; the code instead averages 128 random training-augmented patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.augment import ops
from selfsup.heads import mlp, mlp_blocks
from selfsup.losses import emp_ssl_terms
from selfsup.methods.base import Method
from selfsup.params import AT_LEAST_ONE, FRACTION, POSITIVE, check_limits, check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views

EVAL_FEATURES = ("backbone", "projector_hidden")


def grid_offsets(side: int, patch: int, count: int) -> list[int]:
    """`count` patch positions spread evenly from one edge to the other (one: the centre)."""
    if count == 1:
        return [(side - patch) // 2]
    return [round(i * (side - patch) / (count - 1)) for i in range(count)]


class BagOfFeatures(nn.Module):
    """The representation: the mean of the features of a fixed grid × grid of patches of each
    image, (N, num_features). A patch covers `patch_scale` of the image's area, as in training,
    and is resized to `patch_size` (None: the image's side) with the views' own resampling."""

    def __init__(
        self,
        patch_encoder: nn.Module,
        num_features: int,
        patch_scale: float,
        patch_size: int | None,
        grid: int,
    ) -> None:
        super().__init__()
        self.patch_encoder = patch_encoder
        self.num_features = num_features
        self.patch_scale, self.patch_size, self.grid = patch_scale, patch_size, grid

    def patches(self, x: Tensor) -> list[Tensor]:
        """The grid's patches of x (N, C, H, W), row by row: grid² tensors (N, C, p, p)."""
        n, _, height, width = x.shape
        side = min(height, width, round(math.sqrt(self.patch_scale * height * width)))
        size = self.patch_size or min(height, width)
        out = []
        for top in grid_offsets(height, side, self.grid):
            for left in grid_offsets(width, side, self.grid):
                if side == size:
                    out.append(x[:, :, top : top + side, left : left + side])
                else:
                    box = torch.tensor([top, left, side, side], device=x.device).expand(n, 4)
                    out.append(ops.resized_crop(x, box, size).to(x.dtype))
        return out

    def forward(self, x: Tensor) -> Tensor:
        # one grid position at a time: the memory of a plain batch; eval-mode BN makes it exact
        total = 0
        for patch in self.patches(x):
            total = total + self.patch_encoder(patch)
        return total / self.grid**2


@METHODS.register("emp_ssl")
class EMPSSL(Method):
    """EMP-SSL: n patches per image; total coding rate + invariance to the patches' mean."""

    uses_small_views = True  # every patch, large or small, is one of the n

    def __init__(
        self,
        backbone: nn.Module,
        *,
        make_backbone: Callable[..., nn.Module] | None = None,  # engine-supplied
        dim: int = 1024,  # projection size (code model/model.py encoder z_dim=1024)
        hidden: int = 4096,  # projector width (code hidden_dim=4096)
        layers: int = 3,  # code: pre_feature (Linear-BN-ReLU) + projection (2 Linears)
        invariance_weight: float = 200.0,  # λ (code main.py --patch_sim 200)
        eps_squared: float = 0.2,  # ε² of R (code --eps 0.2, used as d/(b·eps))
        # the patches' resolution: None resizes them to the image's side (code: 32 px on CIFAR);
        # set, the patch encoder is built for it (a ViT's position embeddings) and views.patch_size
        # must match
        patch_size: int | None = None,
        patch_scale: float = 0.25,  # area of a patch / the image's (code RandomResizedCrop scale)
        eval_grid: int = 4,  # grid × grid patches in the bag of features (code: 128 random ones)
        # the bag's features: the backbone's, or the first projector block's (code evaluate.py)
        eval_features: str = "backbone",
    ) -> None:
        check_method(
            dim=dim, hidden=hidden, invariance_weight=invariance_weight, patch_size=patch_size,
        )  # fmt: skip
        check_limits(
            "method",
            {"layers": layers, "eps_squared": eps_squared, "patch_scale": patch_scale,
             "eval_grid": eval_grid},
            {"layers": AT_LEAST_ONE, "eps_squared": POSITIVE, "patch_scale": FRACTION,
             "eval_grid": AT_LEAST_ONE},
        )  # fmt: skip
        if eval_features not in EVAL_FEATURES:
            raise ValueError(
                f"'method.eval_features' must be one of {', '.join(EVAL_FEATURES)}, "
                f"got {eval_features!r}"
            )
        if eval_features == "projector_hidden" and layers < 2:
            raise ValueError(
                "method.eval_features=projector_hidden needs a hidden projector layer "
                f"(method.layers >= 2, got {layers})"
            )
        if patch_size is not None and make_backbone is not None:
            backbone = make_backbone(image_size=patch_size)
        super().__init__(backbone)
        # Linear-BN-ReLU on the hidden layers, then a Linear with bias: the code's pre_feature +
        # projection (torch's Linear keeps its bias before the BN)
        self.projector = mlp(
            backbone.num_features, hidden, dim, layers=layers, bias_before_norm=True
        )
        self.invariance_weight, self.eps_squared = invariance_weight, eps_squared
        self.patch_size, self.patch_scale = patch_size, patch_scale
        self.eval_grid, self.eval_features = eval_grid, eval_features

    @property
    def encoder(self) -> BagOfFeatures:
        patch_encoder, width = self.backbone, self.backbone.num_features
        if self.eval_features == "projector_hidden":
            patch_encoder = nn.Sequential(self.backbone, mlp_blocks(self.projector)[0])
            width = self.projector[0].out_features
        return BagOfFeatures(
            patch_encoder, width, self.patch_scale, self.patch_size, self.eval_grid
        )

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        patches = views.large + views.small  # the n patches of each image
        sizes = sorted({p.shape[-1] for p in patches})
        if self.patch_size is not None and sizes != [self.patch_size]:
            raise ValueError(
                f"EMP-SSL's method.patch_size is {self.patch_size} and the views give "
                f"{sizes}-px patches: set views.patch_size={self.patch_size} (the emp_ssl views)"
            )
        # All patches in one backbone batch and one projector batch (BN over every patch of
        # the batch), as the code's single forward of the concatenated patches.
        h = torch.cat(self.encode(patches))  # (n·N, D)
        z = F.normalize(self.projector(h), dim=1).unflatten(0, (len(patches), -1))  # (n, N, dim)
        # (n, B, dim): R is over the global batch; D is per image, the same over any rows
        z = views.global_batch.gather(z.transpose(0, 1)).transpose(0, 1)
        coding_rate, invariance = emp_ssl_terms(z, self.eps_squared)
        loss = -(coding_rate + self.invariance_weight * invariance)  # −(R + λ·D), §3
        with torch.no_grad():
            z_std = z[0].float().std(dim=0).mean()  # ≈ 1/sqrt(dim) when spread, 0 on collapse
        return {
            "loss": loss,
            "coding_rate": coding_rate.detach(),
            "invariance": invariance.detach(),
            "z_std": z_std,
        }
