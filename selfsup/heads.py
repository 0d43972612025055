"""Projector and predictor heads: one MLP builder covers every method's heads; DINO's head adds an
L2 bottleneck and a weight-normalised output layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(
    in_dim: int,
    hidden: int,
    out_dim: int,
    *,
    layers: int = 2,
    norm: str | None = "bn",
    last_norm: str | None = None,
    bias_before_norm: bool = False,
    last_bias: bool = True,
    activation: str = "relu",
) -> nn.Sequential:
    """`layers` Linear layers; every one but the last is followed by norm + activation.

    SimCLR's projector: mlp(d, 2048, 128); SimCLR v2: layers=3; SimSiam's projector ends in BN
    without affine parameters (last_norm="bn_noaffine"); BYOL's predictor: mlp(256, 4096, 256);
    DINO's head: layers=3, norm=None, activation="gelu".
    A Linear followed by a norm has no bias (unless bias_before_norm); one without a norm has one,
    the last one unless last_bias=False (MoCo v3's heads have no bias anywhere).
    """
    if layers < 1:
        raise ValueError(f"an mlp needs at least 1 layer, got layers={layers}")
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = i == layers - 1
        kind = last_norm if last else norm
        bias = (last_bias or not last) if kind is None else bias_before_norm
        modules.append(nn.Linear(a, b, bias=bias))
        if kind is not None:
            modules.append(_norm(kind, b))
        if not last:
            modules.append(_activation(activation))
    return nn.Sequential(*modules)


def mlp_blocks(projector: nn.Module) -> list[nn.Sequential]:
    """A projector cut after each layer: every block starts with a Linear and holds the norm and
    activation that follow it (`mlp`'s Linear [+ norm] [+ activation]), sharing its modules; a
    bare Linear (MoCo v1, InstDisc) is one block. The hidden blocks are all but the last."""
    if isinstance(projector, nn.Linear):
        return [nn.Sequential(projector)]
    if not isinstance(projector, nn.Sequential) or not isinstance(projector[0], nn.Linear):
        raise ValueError(
            f"the projector is a {type(projector).__name__}; expected an nn.Linear or an "
            f"nn.Sequential of Linear [+ norm + activation] blocks (heads.mlp)"
        )
    blocks: list[list[nn.Module]] = []
    for module in projector:
        if isinstance(module, nn.Linear):
            blocks.append([])
        blocks[-1].append(module)
    return [nn.Sequential(*block) for block in blocks]


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(dim)
    if kind == "bn_noaffine":
        return nn.BatchNorm1d(dim, affine=False)
    if kind == "ln":
        return nn.LayerNorm(dim)
    raise ValueError(f"unknown norm '{kind}'; valid: bn, bn_noaffine, ln")


def _activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation '{kind}'; valid: relu, gelu")


class WeightNormLinear(nn.Module):
    """A linear layer without bias whose rows are w_k = g_k · v_k / ||v_k|| (weight normalisation,
    Salimans & Kingma 2016, arXiv 1602.07868).

    weight_v (out, in), weight_g (out, 1): torch's weight_norm names, so DINO's checkpoints load.
    g starts at 1 and is trained only if `train_norm`; with it fixed every row has unit norm and
    the output is a cosine similarity to each of the `out` directions.
    """

    def __init__(self, in_dim: int, out_dim: int, *, train_norm: bool = False) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's own, as DINO's code
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=train_norm)

    @property
    def weight(self) -> Tensor:
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, arXiv 2104.14294, §3.1 "Network architecture"):
    an MLP with GELU to a bottleneck, L2 normalisation, then a weight-normalised linear layer to
    `out_dim` (K) without bias.

    Parameter names and initialisation as the official DINOHead (mlp.0, mlp.2, ...,
    last_layer.weight_g, last_layer.weight_v; trunc-normal 0.02 MLP weights, zero biases).
    use_bn: BN after every hidden Linear (the code's use_bn_in_head, an option for ResNets).
    norm_last_layer: the last layer's row norms g stay 1 (the code's default; it trains them
    otherwise, "better performance but can be unstable", README: only with ViT-S).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden: int = 2048,
        bottleneck: int = 256,
        layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        norm = "bn" if use_bn else None  # the code keeps the Linear's bias before its BN
        self.mlp = mlp(in_dim, hidden, bottleneck, layers=layers, norm=norm,
                       bias_before_norm=True, activation="gelu")  # fmt: skip
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, train_norm=not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_dim) -> (N, out_dim) logits: cosine similarities when norm_last_layer."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
