"""Vision Transformer tiny/small/base (Dosovitskiy et al., arXiv 2010.11929) with timm's names.

The image is cut into patch_size x patch_size patches, embedded by one strided convolution,
prefixed with a CLS token and given position embeddings; the CLS token after the final norm is the
representation. MoCo v3 (arXiv 2104.02057) options: fixed 2D sin-cos position embeddings and a
frozen random patch projection, which it found to stabilise training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.registry import BACKBONES

POS_EMBEDDINGS = ("learned", "sincos")


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos position embedding as in MoCo v3, (1, 1 + grid_h*grid_w, dim).

    A quarter of the channels each hold sin/cos of the column and of the row; the CLS slot is 0.
    """
    h, w = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32),
        torch.arange(grid_w, dtype=torch.float32),
        indexing="ij",
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = w.flatten()[:, None] * omega, h.flatten()[:, None] * omega
    pos = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pos])[None]


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al., arXiv 1603.09382): zero a residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, H/p * W/p, D) by a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, L, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT trunk: `forward(x)` (N, C, H, W) -> CLS token after the final norm, (N, embed_dim)."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        image_size: int = 224,
        in_channels: int = 3,
        drop_path: float = 0.0,
        pos_embedding: str = "learned",
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"ViT image_size {image_size} is not divisible by patch_size {patch_size}; "
                f"set image_size to a multiple of {patch_size} or pick a patch_size that divides it"
            )
        if pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(
                f"unknown pos_embedding '{pos_embedding}'; valid: {', '.join(POS_EMBEDDINGS)}"
            )
        self.patch_size, self.num_features = patch_size, embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        grid = image_size // patch_size
        if pos_embedding == "sincos":  # a buffer: fixed, but saved under timm's key `pos_embed`
            self.register_buffer("pos_embed", sincos_2d(grid, grid, embed_dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # stochastic depth rising linearly from 0 to drop_path over the blocks, as timm
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # CLS outputs of four evenly spaced blocks (3, 6, 9, 12 for depth 12)
        self.stage_indices = [depth * (i + 1) // 4 - 1 for i in range(4)]
        self.stage_names = [f"blocks.{i}" for i in self.stage_indices]

        nn.init.normal_(self.cls_token, std=1e-6)  # timm's initialisation
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.patch_embed.requires_grad_(not freeze_patch_embed)

    def _pos_embed(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings for a grid_h x grid_w patch grid (other crop sizes, e.g. DINO's)."""
        side = math.isqrt(self.pos_embed.shape[1] - 1)
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        if isinstance(self.pos_embed, nn.Parameter):
            patches = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=(grid_h, grid_w), mode="bicubic")
            patches = patches.flatten(2).transpose(1, 2)
            return torch.cat([self.pos_embed[:, :1], patches], dim=1)
        return sincos_2d(grid_h, grid_w, self.num_features).to(self.pos_embed)

    def _tokens(self, x: Tensor) -> Tensor:
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self._pos_embed(grid_h, grid_w)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """CLS token (N, embed_dim) after the blocks named in `stage_names`, before the norm."""
        x, stages = self._tokens(x), []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_indices:
                stages.append(x[:, 0])
        return stages

    def forward(self, x: Tensor) -> Tensor:
        x = self._tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def _register(
    name: str, embed_dim: int, num_heads: int, doc: str
) -> Callable[..., VisionTransformer]:
    """A registered 12-block factory `name(*, in_channels, image_size, patch_size, ...)`."""

    def factory(
        *,
        in_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 16,
        drop_path: float = 0.0,
        pos_embedding: str = "learned",
        freeze_patch_embed: bool = False,
    ) -> VisionTransformer:
        return VisionTransformer(
            embed_dim=embed_dim,
            depth=12,
            num_heads=num_heads,
            patch_size=patch_size,
            image_size=image_size,
            in_channels=in_channels,
            drop_path=drop_path,
            pos_embedding=pos_embedding,
            freeze_patch_embed=freeze_patch_embed,
        )

    return BACKBONES.add(name, factory, doc)


vit_tiny = _register("vit_tiny", 192, 3, "ViT-Tiny: 192 dims, 12 blocks, 3 heads.")
vit_small = _register("vit_small", 384, 6, "ViT-Small: 384 dims, 12 blocks, 6 heads.")
vit_base = _register("vit_base", 768, 12, "ViT-Base: 768 dims, 12 blocks, 12 heads.")
