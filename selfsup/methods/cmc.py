"""CMC: contrastive multiview coding (Tian, Krishnan & Isola 2019, arXiv 1906.05849).

Each view of an image (the L and ab channels of one Lab crop, §3.3; or, on grayscale data, two
independent crops) has its own encoder and linear head to a unit 128-d embedding. An embedding
of view i must pick its image among k + 1 candidates of view j (eq. 2), symmetrically (eq. 3);
with M views, the core graph contrasts every view with view 1 and the full graph all pairs
(§3.2, eq. 6-7). Candidates are memory-bank entries of view j (one bank per view, K uniformly
sampled negatives, softmax-CE as the code's --softmax, which its README found better than NCE) or
the batch. The representation is the encoders' features side by side (§4: "concatenate").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.dist import gather_nograd
from selfsup.losses import in_batch_info_nce, info_nce_hybrid
from selfsup.methods.base import Method
from selfsup.negatives import MemoryBank
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views

LAB_CHANNELS = [1, 2]  # L | ab of one Lab crop (models/resnet.py splits the input so)


class SideBySide(nn.Module):
    """One encoder per view; the representation of x is their features concatenated.

    With `channels` the input's channels are split among the encoders (L | ab), else every
    encoder sees the whole image (crop views: at evaluation, the same centre crop).
    """

    def __init__(self, encoders: list[nn.Module], channels: list[int] | None) -> None:
        super().__init__()
        self.encoders, self.channels = nn.ModuleList(encoders), channels
        self.num_features = sum(encoder.num_features for encoder in encoders)

    def split(self, x: Tensor) -> list[Tensor]:
        return list(x.split(self.channels, 1)) if self.channels else [x] * len(self.encoders)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([e(v) for e, v in zip(self.encoders, self.split(x), strict=True)], 1)


def _in_channels(backbone: nn.Module) -> int:
    """The data's channels, read from the supplied backbone's first convolution."""
    return next(m for m in backbone.modules() if isinstance(m, nn.Conv2d)).in_channels


@METHODS.register("cmc")
class CMC(Method):
    """CMC: per-view encoders, cross-view contrast against per-view memory banks or the batch."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        make_backbone: Callable[..., nn.Module],
        num_samples: int,
        views: str = "auto",  # lab: L | ab of one Lab crop; crops: a crop per view; auto: lab on
        # colour data, crops on grayscale (pair lab with views `cmc`, color_space lab)
        num_views: int = 2,  # M; crops only (Lab has two)
        graph: str = "full",  # full: all pairs (eq. 7); core: view 1 with each other (eq. 6)
        negatives: str = "memory",  # memory: K bank entries (the code); batch: the other N - 1
        dim: int = 128,  # --feat_dim
        num_negatives: int = 16384,  # K, --nce_k (README: 4096 for the released weights)
        temperature: float = 0.07,  # τ, --nce_t (README: 0.1 on STL-10)
        bank_momentum: float = 0.5,  # --nce_m, InstDisc's m
    ) -> None:
        check_method(
            num_views=num_views, dim=dim, num_negatives=num_negatives, temperature=temperature
        )
        channels = _in_channels(backbone)
        if views == "auto":
            views = "lab" if channels == 3 else "crops"
        choices = {
            "views": (views, ("lab", "crops")),
            "graph": (graph, ("full", "core")),
            "negatives": (negatives, ("memory", "batch")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"method.{key} must be one of {', '.join(allowed)}, not '{value}'")
        if views == "lab" and channels != 3:
            raise ValueError(
                f"method.views=lab needs colour data (L and ab), this data has {channels} "
                f"channel(s); use method.views=crops (recipe cmc/fashion_mnist)"
            )
        if views == "lab" and num_views != 2:
            raise ValueError(f"method.views=lab gives 2 views (L, ab), not num_views={num_views}")
        if views == "lab":  # the code's ResNets: one network per view, 1 and 2 input channels
            encoders = [make_backbone(in_channels=c) for c in LAB_CHANNELS]
        else:
            encoders = [backbone] + [make_backbone() for _ in range(num_views - 1)]
        super().__init__(encoders[0])  # the backbone: view 1's encoder
        self.other_encoders = nn.ModuleList(encoders[1:])
        self.channels = LAB_CHANNELS if views == "lab" else None
        # fc to feat_dim, then l2norm (models/resnet.py): a linear head per view
        self.heads = nn.ModuleList(nn.Linear(e.num_features, dim) for e in encoders)
        if negatives == "memory":
            self.banks = nn.ModuleList(
                MemoryBank(num_samples, dim, bank_momentum) for _ in encoders
            )
        self.views, self.negatives = views, negatives
        self.num_negatives, self.temperature = num_negatives, temperature
        pairs = itertools.combinations(range(num_views), 2)
        self.pairs = list(pairs) if graph == "full" else [(0, j) for j in range(1, num_views)]

    @property
    def encoder(self) -> SideBySide:
        """All view encoders side by side (built on access: its modules are the method's own)."""
        return SideBySide([self.backbone, *self.other_encoders], self.channels)

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        parts = zip(self.encoder.encoders, self.heads, self._inputs(views), strict=True)
        z = [F.normalize(head(encoder(x)), dim=1) for encoder, head, x in parts]  # (N, dim) each
        out = {}
        if self.negatives == "memory":
            loss = self._memory_loss(z, views.index)
            out["index"] = views.index
        else:
            everyone = [views.global_batch.gather(z_v) for z_v in z]  # candidates: whole batch
            same = torch.arange(len(everyone[0]), device=z[0].device)  # positive: same image
            loss = sum(
                in_batch_info_nce(everyone[q], everyone[k], same, self.temperature)
                for i, j in self.pairs
                for q, k in ((i, j), (j, i))
            )  # L(V_i, V_j) = L_{V_i,V_j} + L_{V_j,V_i} (eq. 3), summed over the graph
        with torch.no_grad():
            positive = sum((z[i] * z[j]).sum(1).mean() for i, j in self.pairs) / len(self.pairs)
        return {
            "loss": loss,
            "pos_sim": positive,
            "z_std": z[0].detach().std(dim=0).mean(),  # ≈ 1/sqrt(dim) when spread, 0 on collapse
            "embeddings": torch.stack(z, dim=1).detach(),  # (N, M, dim), written to the banks
            **out,
        }

    def _memory_loss(self, z: list[Tensor], index: Tensor) -> Tensor:
        """Σ over the graph's pairs of both directions; candidates of view j: its bank's entry
        of the image (the positive, as NCEAverage) and K entries drawn uniformly (noise);
        softmax cross-entropy over the K + 1 (the code's NCESoftmaxLoss)."""
        noise = self.banks[0].sample((len(z[0]), self.num_negatives))  # (N, K): shared, as the code
        positives = [bank[index] for bank in self.banks]  # (N, dim) each
        no_shared = z[0].new_zeros(0, z[0].shape[1])  # CMC has no negatives shared by all
        return sum(
            info_nce_hybrid(
                z[q],
                positives[k],
                no_shared,
                self.banks[k].similarity(z[q], noise),
                self.temperature,
            )
            for i, j in self.pairs
            for q, k in ((i, j), (j, i))  # view q's embedding against view k's bank
        )

    def _inputs(self, views: Views) -> list[Tensor]:
        if self.views == "lab":
            x = views.large[0]
            if x.shape[1] != 3:
                raise ValueError(
                    f"method.views=lab splits a 3-channel Lab crop into L | ab, got "
                    f"{x.shape[1]} channel(s): use views {{name: cmc, color_space: lab}}"
                )
            return self.encoder.split(x)
        if len(views.large) < len(self.heads):
            raise ValueError(
                f"method.num_views={len(self.heads)} needs as many large views, the views "
                f"give {len(views.large)}: set views.num_views"
            )
        return views.large[: len(self.heads)]

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        if self.negatives != "memory":
            return
        index = gather_nograd(out["index"])
        for bank, embeddings in zip(self.banks, out["embeddings"].unbind(1), strict=True):
            bank.update(index, gather_nograd(embeddings))  # v ← normalise(m·v + (1 − m)·z)
