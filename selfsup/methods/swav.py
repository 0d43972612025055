"""SwAV: swapping assignments between views (Caron et al. 2020, arXiv 2006.09882).

Online clustering instead of pairwise contrast: every crop's L2-normalised projection z is scored
against K trainable prototypes (`Prototypes`, kept on the unit sphere), and each large crop gets a
soft code q, an assignment of its batch to the prototypes computed without gradient by
Sinkhorn-Knopp under an equal-share constraint (`prototypes.sinkhorn`, over the batch of every
process). Each crop then predicts, by a softmax over its scores at τ 0.1, the codes of the other
large crops: the swapped prediction (§3.1, `losses.swapped_prediction`). Multi-crop (§3.2): the
small crops (`views.small`) only predict; codes come from the large ones (`views.large`). For
small batches a queue of the large crops' projections from earlier batches joins the Sinkhorn
problem (not the loss), so that K prototypes can be shared out over more than the batch (§3.1
"Working with small batches"). Unlike DINO (dino.py) there is no teacher: the codes come from the
network itself, and the equal shares, not a centre, keep it from collapsing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.dist import GlobalBatch, gather_nograd
from selfsup.heads import mlp
from selfsup.losses import swapped_prediction
from selfsup.methods.base import Method
from selfsup.negatives import Queue
from selfsup.params import Group, check_method
from selfsup.prototypes import Prototypes, sinkhorn
from selfsup.registry import METHODS
from selfsup.step import Progress, Views

QUEUED_CROPS = 2  # the queue keeps the two large crops' projections (code: crops_for_assign 0 1)


@METHODS.register("swav")
class SwAV(Method):
    """SwAV: each crop predicts the Sinkhorn codes of the other large crops over K prototypes."""

    uses_small_views = True  # the small crops predict (§3.2, multi-crop)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,  # projection size (code --feat_dim; App. A.1)
        hidden: int = 2048,  # projector hidden width (code --hidden_mlp)
        num_prototypes: int = 3000,  # K for ImageNet (App. A.1; code --nmb_prototypes)
        temperature: float = 0.1,  # τ of the softmax over prototype scores (App. A.1; code)
        epsilon: float = 0.05,  # ε, Sinkhorn's entropy weight (App. A.1; code --epsilon)
        sinkhorn_iterations: int = 3,  # few iterations are enough (§3.1; code default 3)
        queue_size: int = 0,  # projections kept per large crop, all processes; 0: none (code)
        queue_start_epoch: float = 15,  # the queue fills from here (code --epoch_queue_starts)
        freeze_prototypes_epochs: float = 1,  # code: 313 iterations = 1 epoch at batch 4096
    ) -> None:
        check_method(
            dim=dim, hidden=hidden, num_prototypes=num_prototypes, temperature=temperature,
            epsilon=epsilon, sinkhorn_iterations=sinkhorn_iterations, queue_size=queue_size,
            queue_start_epoch=queue_start_epoch, freeze_prototypes_epochs=freeze_prototypes_epochs,
        )  # fmt: skip
        super().__init__(backbone)
        self.projector = mlp(backbone.num_features, hidden, dim)  # Linear-BN-ReLU-Linear (code)
        self.prototypes = Prototypes(dim, num_prototypes)  # unit rows from the start (code)
        self.temperature, self.epsilon = temperature, epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.queue_size, self.queue_start_epoch = queue_size, queue_start_epoch
        self.freeze_prototypes_epochs = freeze_prototypes_epochs
        # Built only with a queue, so a model without one keeps exactly its own state keys.
        self.queues = None
        if queue_size:
            self.queues = nn.ModuleList(Queue(queue_size, dim) for _ in range(QUEUED_CROPS))
            # Rows pushed so far (at most queue_size): the queue joins Sinkhorn once it is full,
            # as in the code (never with the random rows it starts with).
            self.register_buffer("queued", torch.zeros((), dtype=torch.long))

    def queue_in_use(self) -> bool:
        return self.queues is not None and bool(self.queued >= self.queue_size)

    @torch.no_grad()
    def assign(
        self, scores: Tensor, crop: int, use_queue: bool, global_batch: GlobalBatch
    ) -> Tensor:
        """The codes (N, K) of one large crop's batch from its scores (N, K), no gradient; the
        batch is one of the parts of `global_batch`, which Sinkhorn assigns together."""
        scores = scores.detach()
        n = len(scores)
        if use_queue:
            # Each part holds the whole queue and adds its own share of the rows, so Sinkhorn's
            # all-reduced sums count every queued projection once.
            queued = self.queues[crop].keys.tensor_split(global_batch.parts)[global_batch.rank]
            scores = torch.cat([self.prototypes(queued).to(scores.dtype), scores])
        codes = sinkhorn(scores, self.epsilon, self.sinkhorn_iterations, global_batch)
        return codes[-n:]  # the batch's rows

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        if self.queues is not None and len(views.large) != QUEUED_CROPS:
            raise ValueError(
                f"SwAV's queue holds {QUEUED_CROPS} large crops, the views give "
                f"{len(views.large)}: use 2 large crops (views.num_views=2) or method.queue_size=0"
            )
        crops = views.large + views.small  # large crops first: scores[i] is the i-th large crop
        # One projector batch over all crops (BN sees them together), as the code's forward_head;
        # the backbone runs once per crop size (`encode`).
        z = F.normalize(self.projector(torch.cat(self.encode(crops))), dim=1)  # (V·N, dim)
        scores = self.prototypes(z).chunk(len(crops))  # V × (N, K): z_v·c_k
        use_queue = self.queue_in_use()
        codes = [  # G × (N, K)
            self.assign(scores[i], i, use_queue, views.global_batch)
            for i in range(len(views.large))
        ]
        loss = swapped_prediction(list(scores), codes, self.temperature)
        n = len(views.large[0])
        out = {}
        if self.queues is not None:  # pushed after the step (`after_step`), used by later batches
            # (N, G, dim): one row per sample, as every tensor a forward returns (Method.forward)
            out["embeddings"] = z[: len(views.large) * n].detach().unflatten(0, (-1, n))
            out["embeddings"] = out["embeddings"].transpose(0, 1)
        with torch.no_grad():
            code = codes[0].float()
            # log K when a sample is spread over all prototypes, 0 when it sits on one
            code_entropy = -(code * code.clamp_min(1e-12).log()).sum(dim=1).mean()
            z_std = z[:n].float().std(dim=0).mean()  # ≈ 1/sqrt(dim), 0 on collapse
        return {
            "loss": loss,
            "code_entropy": code_entropy,
            "z_std": z_std,
            "queue_in_use": loss.new_tensor(float(use_queue)),
            **out,
        }

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        self.prototypes.normalize_()  # back onto the unit sphere after the step (§3.1, code)
        if self.queues is not None and progress.epoch >= self.queue_start_epoch:
            for queue, embeddings in zip(self.queues, out["embeddings"].unbind(1), strict=True):
                batch = gather_nograd(embeddings)  # every process's rows: the same queue on each
                queue.push(batch)
            self.queued.add_(len(batch)).clamp_(max=self.queue_size)

    def parameter_groups(self) -> dict[str, Group]:
        # The prototypes get no update at all at first (code: their gradients cancelled for
        # freeze_prototypes_niters); the engine drops their gradients, so no decay either.
        if self.freeze_prototypes_epochs == 0:
            return {}
        return {"prototypes": Group(frozen_epochs=self.freeze_prototypes_epochs)}
