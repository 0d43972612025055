"""InstDisc: non-parametric instance discrimination (Wu et al. 2018, arXiv 1805.01978).

Every training image is its own class, and its class "weight" is a memory-bank entry: the
running average of that image's own past embeddings, v ← normalise(m·v + (1 − m)·f). An image's
embedding f must pick out its entry among all n; NCE (§3.2) replaces the n-way softmax by K
entries drawn uniformly as noise and a normalising constant Z estimated once, on the first
batch. One view per image per step: the positive is the memory entry, not a second view (the
ancestor of MoCo's queue and SimCLR's two views). `loss: softmax` is the exact n-way softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.dist import gather_nograd
from selfsup.losses import nce, non_parametric_softmax
from selfsup.methods.base import Method
from selfsup.negatives import MemoryBank
from selfsup.params import check_method
from selfsup.registry import METHODS
from selfsup.step import Progress, Views


@METHODS.register("instdisc")
class InstDisc(Method):
    """InstDisc: one view vs its memory-bank entry, K uniform noise entries, NCE (eq. 6)."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_samples: int,
        dim: int = 128,  # fc to 128-d, then L2 norm (§3.1)
        loss: str = "nce",  # nce (§3.2) | softmax: the full non-parametric softmax (eq. 2)
        num_noise: int = 4096,  # K (§3.2; the code's --nce-k)
        temperature: float = 0.07,  # τ (main.py's --nce-t; cifar.py uses 0.1)
        bank_momentum: float = 0.5,  # m of the memory update (§3.2; --nce-m)
        proximal: float = 0.0,  # λ of §3.3's proximal term; the official code has none
    ) -> None:
        if loss not in ("nce", "softmax"):
            raise ValueError(f"'method.loss' must be 'nce' or 'softmax', got {loss!r}")
        check_method(
            bank_momentum=bank_momentum, proximal=proximal, dim=dim, num_noise=num_noise,
            temperature=temperature,
        )  # fmt: skip
        super().__init__(backbone)
        self.projector = nn.Linear(backbone.num_features, dim)
        self.bank = MemoryBank(num_samples, dim, bank_momentum)
        # Z of P(i|v) = exp(v_i·f/τ)/Z: -1 (unset, as in NCEAverage) until the first step's
        # estimate is stored; then fixed (§3.2), and resumed with the checkpoint.
        self.register_buffer("normaliser", torch.tensor(-1.0))
        self.loss, self.num_noise, self.temperature = loss, num_noise, temperature
        self.proximal = proximal

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        if views.index is None:
            raise ValueError("instdisc needs the dataset indices of the batch (views.index)")
        index = views.index.to(self.bank.features.device)
        f = F.normalize(self.projector(self.backbone(views.large[0])), dim=1)  # (N, dim)
        own = self.bank[index]  # (N, dim): v_i, the positive; no gradient into the bank
        out = {"pos_sim": (f.detach() * own).sum(dim=1).mean()}
        if self.loss == "softmax":
            loss = non_parametric_softmax(f.float(), self.bank.features, index, self.temperature)
        else:
            noise = self.bank.sample((len(f), self.num_noise))  # (N, K) rows, P_n = 1/n
            positive_logits = (f.float() * own).sum(dim=1) / self.temperature  # (N,)
            noise_logits = self.bank.similarity(f.float(), noise) / self.temperature  # (N, K)
            with torch.no_grad():  # Z ≈ n·mean exp(v·f/τ) over the batch's 1 + K entries (§3.2)
                logits = torch.cat([positive_logits[:, None], noise_logits], dim=1).flatten()
                log_mean = logits.logsumexp(dim=0) - math.log(logits.numel())
                estimate = (log_mean + math.log(len(self.bank))).exp()
                z = torch.where(self.normaliser < 0, estimate, self.normaliser)
            loss = nce(positive_logits, noise_logits, z.log(), 1 / len(self.bank))
            out["nce_z"] = z  # stored by after_step on the first step
        if self.proximal:  # + λ‖v_i^(t) − v_i^(t−1)‖² (§3.3), v^(t−1) the bank entry
            loss = loss + self.proximal * (f - own).pow(2).sum(dim=1).mean()
        return {"loss": loss, **out, "index": index, "embedding": f.detach()}

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        if "nce_z" in out:  # the first step's estimate, averaged over the processes, stays
            estimate = gather_nograd(out["nce_z"].view(1)).mean()
            self.normaliser.copy_(torch.where(self.normaliser < 0, estimate, self.normaliser))
        self.bank.update(gather_nograd(out["index"]), gather_nograd(out["embedding"]))
