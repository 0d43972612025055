"""Projector and predictor heads: one MLP builder covers every method's heads."""

from __future__ import annotations

from torch import nn


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
) -> nn.Sequential:
    """`layers` Linear layers; every one but the last is followed by norm + ReLU.

    SimCLR's projector: mlp(d, 2048, 128); SimCLR v2: layers=3; SimSiam's projector ends in BN
    without affine parameters (last_norm="bn_noaffine"); BYOL's predictor: mlp(256, 4096, 256).
    A Linear followed by a norm has no bias (unless bias_before_norm); the last one without a
    norm has one unless last_bias=False (MoCo v3's heads have no bias anywhere).
    """
    if layers < 1:
        raise ValueError(f"an mlp needs at least 1 layer, got layers={layers}")
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = i == layers - 1
        kind = last_norm if last else norm
        bias = (kind is None and (last_bias or not last)) or bias_before_norm
        modules.append(nn.Linear(a, b, bias=bias))
        if kind is not None:
            modules.append(_norm(kind, b))
        if not last:
            modules.append(nn.ReLU(inplace=True))
    return nn.Sequential(*modules)


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(dim)
    if kind == "bn_noaffine":
        return nn.BatchNorm1d(dim, affine=False)
    if kind == "ln":
        return nn.LayerNorm(dim)
    raise ValueError(f"unknown norm '{kind}'; valid: bn, bn_noaffine, ln")
