"""CPC: contrastive predictive coding on images (van den Oord et al. 2018, arXiv 1807.03748, §3.3;
Hénaff et al. 2019, CPC v2, arXiv 1905.09272).

An image is cut into an overlapping grid of patches; the patch encoder (the backbone) turns each
into a vector z_{i,j}. A context network that sees only rows ≤ i gives c_{i,j}, and one linear map
per offset predicts the patch k rows below, ẑ_{i+k,j} = W_k c_{i,j}; InfoNCE must pick the true
z_{i+k,j} among all patches of the batch, from all images (v2 §3). Offsets start at k = 2: row i + 1
shares half its pixels with row i, which the context sees (v2 §3: "k > 1"). Unlike SimCLR or MoCo
there is one view per image and the negatives are other patches, not other images.
The representation is the mean of the patch vectors of the grid (PatchGridEncoder).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.backbones import layer_norm_for_batch_norm
from selfsup.losses import in_batch_info_nce
from selfsup.methods.base import Method
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views


def patch_grid(x: Tensor, size: int, stride: int) -> Tensor:
    """(N, C, H, W) -> (N, rows, cols, C, size, size): the patches at (i·stride, j·stride)."""
    if min(x.shape[-2:]) < size:
        raise ValueError(
            f"CPC cuts {size}-px patches ('method.patch_size') from {tuple(x.shape[-2:])} images; "
            f"set method.patch_size to at most the views' size"
        )
    return x.unfold(2, size, stride).unfold(3, size, stride).permute(0, 2, 3, 1, 4, 5)


class PatchGridEncoder(nn.Module):
    """The representation: the mean of the patch vectors of an image's patch grid, (N, D)."""

    def __init__(self, patch_encoder: nn.Module, patch_size: int, patch_stride: int) -> None:
        super().__init__()
        self.patch_encoder = patch_encoder
        self.patch_size, self.patch_stride = patch_size, patch_stride
        self.num_features = patch_encoder.num_features

    def grid(self, x: Tensor) -> Tensor:
        """z of every patch, (N, D, rows, cols); all patches of the batch in one encoder batch."""
        patches = patch_grid(x, self.patch_size, self.patch_stride)  # (N, rows, cols, C, p, p)
        n, rows, cols = patches.shape[:3]
        z = self.patch_encoder(patches.reshape(n * rows * cols, *patches.shape[3:]))
        return z.reshape(n, rows, cols, -1).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.grid(x).mean(dim=(2, 3))  # CPC v2's linear evaluation pools the grid too


class RowCausalBlock(nn.Module):
    """Residual block whose 3x3 convolution sees the rows above and its own (a PixelCNN mask with
    the rows below zeroed), made exact by padding on top only: output row i ← input rows i-1, i.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.causal = nn.Conv2d(hidden, hidden, (2, 3))
        self.expand = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.reduce(x))
        h = F.relu(self.causal(F.pad(h, (1, 1, 1, 0))))  # (left, right, top, bottom)
        return x + self.expand(h)


@METHODS.register("cpc")
class CPC(Method):
    """CPC v1/v2 on a patch grid: a row-causal context predicts the patch vectors k rows below."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        make_backbone: Callable[..., nn.Module] | None = None,  # engine-supplied
        # 64-px patches, stride 32: a 7x7 grid of 256-px images (v1 §3.3); 28-px data: 8 / 4
        patch_size: int = 64,
        patch_stride: int = 32,
        prediction_steps: int = 5,  # offsets k = 2..6: "up to five rows" of the 7x7 grid (v1 §3.3)
        context_blocks: int = 4,  # not given in the papers; Greedy InfoMax's PixelCNN has 4 layers
        context_hidden: int | None = None,  # None: num_features / 4, a ResNet bottleneck's ratio
        # v2 §4.1: batch norm lets the encoder pass information between the patches of a batch
        # past the context's mask; v2 replaces it by layer norm (a ViT has no batch norm)
        layer_norm: bool = True,
    ) -> None:
        check_method(
            patch_size=patch_size, patch_stride=patch_stride, prediction_steps=prediction_steps,
            context_hidden=context_hidden,  # None: a quarter of the patch features
        )  # fmt: skip
        patch_encoder = make_backbone(image_size=patch_size) if make_backbone else backbone
        if layer_norm:
            layer_norm_for_batch_norm(patch_encoder)
        super().__init__(patch_encoder)  # the backbone is the patch encoder
        self.patch_size, self.patch_stride = patch_size, patch_stride
        dim = patch_encoder.num_features
        hidden = context_hidden or max(dim // 4, 1)
        self.context = nn.Sequential(*(RowCausalBlock(dim, hidden) for _ in range(context_blocks)))
        # W_k of f_k(z, c) = exp(zᵀ W_k c) (v1 eq. 3), k = 2 .. prediction_steps + 1
        self.predictors = nn.ModuleList(
            nn.Linear(dim, dim, bias=False) for _ in range(prediction_steps)
        )

    @property
    def encoder(self) -> PatchGridEncoder:
        return PatchGridEncoder(self.backbone, self.patch_size, self.patch_stride)

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        # One view per image: the papers augment each patch, our views are per image.
        z = self.encoder.grid(views.large[0])  # (N, D, rows, cols)
        n, dim, rows, cols = z.shape
        if rows < 3:
            raise ValueError(
                f"CPC predicts at least 2 rows below, and the {rows}-row patch grid has none; "
                f"make method.patch_size or method.patch_stride smaller"
            )
        c = self.context(z)  # c_{i,j} depends on z_{u,v}, u ≤ i only
        candidates = z.permute(0, 2, 3, 1).reshape(n * rows * cols, dim)  # row-major patches
        first = views.global_batch.rank * len(candidates)  # our patches in the gathered batch
        candidates = views.global_batch.gather(candidates)  # negatives: the global batch's (v2 §3)
        index = torch.arange(n * rows * cols, device=z.device).view(n, rows, cols)
        predictions, positives = [], []
        for k, predictor in enumerate(self.predictors[: rows - 2], start=2):  # k < rows only
            context = c[:, :, : rows - k].permute(0, 2, 3, 1).reshape(-1, dim)
            predictions.append(predictor(context))  # ẑ_{i+k,j} = W_k c_{i,j}
            positives.append(first + index[:, k:].reshape(-1))
        predictions, positives = torch.cat(predictions), torch.cat(positives)
        loss = in_batch_info_nce(predictions, candidates, positives)  # τ = 1 (v1 eq. 3)
        with torch.no_grad():  # ≈ 1/sqrt(D) when the patch vectors spread, 0 on collapse
            z_std = F.normalize(candidates, dim=1).std(dim=0).mean()
        return {"loss": loss, "z_std": z_std}
