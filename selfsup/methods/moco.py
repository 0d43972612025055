"""MoCo v1/v2: momentum contrast (He et al. 2019, arXiv 1911.05722; Chen et al. 2020, arXiv
2003.04297), optionally with a hybrid dictionary.

A query must pick its positive key out of a FIFO queue of keys from earlier batches (InfoNCE,
(1 + K)-way); keys come from a slowly moving EMA copy of the query encoder, so the queue stays
consistent while its size is decoupled from the batch size. Unlike SimCLR (simclr.py), negatives
are not the other views of the batch and the key branch gets no gradient. v1 and v2 are one class:
v2 adds an MLP head (mlp_hidden), blur in the views, τ = 0.2 and a cosine schedule (recipes).

Hybrid dictionary (a proposal this project tests, with no paper behind it: combine the queue with a
memory bank that stores the features of selected key samples, keeping the dictionary large and
making it more relevant): with bank_negatives > 0 a memory bank also holds the latest momentum
key of every training image, and each query gets bank_negatives extra negatives from it:
(1 + K + K_b)-way InfoNCE. The proposal names no selection rule; "selected, relevant" samples are
read as the entries most similar to the query (bank_selection "hardest"), with InstDisc's uniform
draw ("uniform") as the plain alternative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.decomposition import Term, info_nce_parts
from selfsup.dist import gather_nograd, shuffled
from selfsup.heads import mlp
from selfsup.losses import info_nce, info_nce_hybrid
from selfsup.methods.base import Method
from selfsup.negatives import MemoryBank, Queue
from selfsup.params import AT_LEAST_ONE, check_limits, check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views
from selfsup.target import EMA, TARGET_SETTINGS

BANK_SELECTIONS = ("hardest", "uniform")


@METHODS.register("moco")
class MoCo(Method):
    """MoCo v1/v2: query vs momentum-encoded key among a queue (+ bank: hybrid) of negatives."""

    target_settings = TARGET_SETTINGS  # momentum: its own EMA, as published (target.py)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        mlp_hidden: int | None = None,  # None: v1's linear head; v2: 2048 (the ResNet-50 width)
        queue_size: int = 65536,  # K (§4.1)
        momentum: float = 0.999,  # m: the best of §4.1's ablation (0.9 is worse, 0 fails)
        temperature: float = 0.07,  # τ; v2 uses 0.2
        shuffle_bn_groups: int = 8,  # BN groups of the key batch: MoCo's 8 GPUs (§3.3); 1: off
        symmetric: bool = False,  # both views as query and key (MoCo's CIFAR demo), 2 keys/sample
        bank_negatives: int = 0,  # K_b per query from the hybrid dictionary's bank; 0: plain MoCo
        bank_selection: str = "hardest",  # the proposal's "selected samples": most similar to q
        # 0: a bank entry is the image's latest key. Keys already come from the momentum encoder,
        # which replaces the memory bank's per-sample momentum (MoCo §3.2); InstDisc's 0.5 would
        # average keys of encoders an epoch apart, the staleness the proposal wants to reduce.
        bank_momentum: float = 0.0,
        num_samples: int | None = None,  # supplied by the engine: one bank slot per image
    ) -> None:
        check_method(
            dim=dim, temperature=temperature, bank_negatives=bank_negatives,
            bank_momentum=bank_momentum,
        )  # fmt: skip
        # the queue is MoCo's dictionary: unlike SimCLR's and SwAV's optional one, never 0
        check_limits("method", {"queue_size": queue_size}, {"queue_size": AT_LEAST_ONE})
        _check_bank(bank_negatives, bank_selection, num_samples)
        super().__init__(backbone)
        width = backbone.num_features
        # v2's head is fc-ReLU-fc without BN, as in MoCo v2's code.
        self.projector = (
            mlp(width, mlp_hidden, dim, norm=None) if mlp_hidden else nn.Linear(width, dim)
        )
        self.target = EMA(self.backbone, self.projector)  # the key encoder
        self.queue = Queue(queue_size, dim)
        # Off: no bank at all, so the state dict (and old checkpoints) stay plain MoCo's.
        self.bank = MemoryBank(num_samples, dim, bank_momentum) if bank_negatives else None
        self.momentum, self.temperature = momentum, temperature
        self.shuffle_bn_groups, self.symmetric = shuffle_bn_groups, symmetric
        self.bank_negatives, self.bank_selection = bank_negatives, bank_selection

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = views.large[:2]
        pairs = [(x1, x2), (x2, x1)] if self.symmetric else [(x1, x2)]
        loss, keys, positive_similarity = 0.0, [], 0.0
        for x_query, x_key in pairs:
            q = F.normalize(self.projector(self.backbone(x_query)), dim=1)  # (N, dim)
            with torch.no_grad():  # keys carry no gradient (§3.2)
                k = shuffled(
                    self.target, x_key, self.shuffle_bn_groups, global_batch=views.global_batch
                )
                k = F.normalize(k, dim=1)  # (N, dim)
            if self.bank is None:
                loss = loss + info_nce(q, k, self.queue.keys, self.temperature)  # (N, 1 + K)
            else:
                rows = self._bank_rows(q.detach(), views.index)  # (N, K_b)
                own = self.bank.similarity(q, rows)  # (N, K_b): q·b for its own bank negatives
                loss = loss + info_nce_hybrid(q, k, self.queue.keys, own, self.temperature)
            keys.append(k)
            positive_similarity = positive_similarity + (q.detach() * k).sum(dim=1).mean()
        with torch.no_grad():
            z_std = q.detach().std(dim=0).mean()  # ≈ 1/sqrt(dim) when spread, 0 on collapse
        out = {
            "loss": loss,
            "pos_sim": positive_similarity / len(pairs),
            "z_std": z_std,
            "keys": torch.cat(keys),  # enqueued after the step (Algorithm 1)
        }
        if self.bank is not None:  # the bank rows the first pair's keys replace
            out["index"], out["bank_keys"] = views.index, keys[0]
        return out

    def gradient_terms(self, views: Views) -> list[Term]:
        if self.bank is not None:
            raise ValueError(
                "gradient decomposition of moco with the hybrid dictionary (method.bank_negatives "
                "> 0) is not supported: its bank negatives are drawn per query; decompose a "
                "queue-only MoCo run"
            )
        x1, x2 = views.large[:2]
        pairs = [(x1, x2), (x2, x1)] if self.symmetric else [(x1, x2)]
        terms = []
        for x_query, x_key in pairs:
            q = F.normalize(self.projector(self.backbone(x_query)), dim=1)  # (N, D)
            k = shuffled(
                self.target, x_key, self.shuffle_bn_groups, global_batch=views.global_batch
            )
            k = F.normalize(k, dim=1)
            n, queue = len(q), self.queue.keys.to(q.dtype)
            # query i's candidates: its own key and the queue, not the other queries' keys
            exclude = F.pad(~torch.eye(n, dtype=torch.bool, device=q.device), (0, len(queue)))
            positives = torch.arange(n, device=q.device)
            candidates = torch.cat([k, queue])
            parts = info_nce_parts(q, candidates, positives, self.temperature, exclude)
            terms.append(("", parts, k))
        return terms

    @torch.no_grad()
    def _bank_rows(self, q: Tensor, index: Tensor) -> Tensor:
        """(N, K_b) bank rows that are query i's extra negatives, never row index[i]: that is an
        older key of q's own image, a positive (and, under "hardest", almost always the top)."""
        index = index.to(q.device)[:, None]  # (N, 1)
        if self.bank_selection == "hardest":
            similarity = q @ self.bank.features.T.to(q.dtype)  # (N, num_samples)
            similarity.scatter_(1, index, float("-inf"))
            return similarity.topk(self.bank_negatives, dim=1).indices
        # uniform over the other num_samples - 1 rows: draw from one fewer and skip the own row
        drawn = torch.randint(len(self.bank) - 1, (len(q), self.bank_negatives), device=q.device)
        return drawn + (drawn >= index).long()

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        self.queue.push(gather_nograd(out["keys"]))  # what all processes produced
        if self.bank is not None:  # one key per image: the first pair's (symmetric: of view 2)
            index = out["index"].to(out["bank_keys"].device)
            self.bank.update(gather_nograd(index), gather_nograd(out["bank_keys"]))
        self.target.update(self.momentum)  # θ_k ← m·θ_k + (1 − m)·θ_q (eq. 2)


def _check_bank(negatives: int, selection: str, num_samples: int | None) -> None:
    if selection not in BANK_SELECTIONS:
        raise ValueError(
            f"'method.bank_selection' must be one of {', '.join(BANK_SELECTIONS)}, got "
            f"{selection!r}"
        )
    if negatives and num_samples is None:
        raise ValueError(
            "'method.bank_negatives' needs a memory bank of one key per training image, but "
            "num_samples is unknown; the engine supplies it (outside it, pass num_samples=)"
        )
    if negatives and negatives > num_samples - 1:
        raise ValueError(
            f"'method.bank_negatives' is {negatives}, but the bank holds only {num_samples - 1} "
            f"other images; set it to at most {num_samples - 1}"
        )
