"""DINO: self-distillation with no labels (Caron et al. 2021, arXiv 2104.14294).

A student (backbone + DINOHead) matches the output distribution of a teacher, an EMA of the
student (`self.target`; the paper calls it the teacher), λ 0.996 → 1 on a cosine (§3.1). The
teacher sees only the global crops (`views.large`), the student every crop, local ones
(`views.small`) too: "local-to-global" correspondences (§3.1, multi-crop). The teacher's output is
centred by a running mean c of its outputs and sharpened by a low temperature; centring alone
would flatten it to uniform, sharpening alone let one dimension dominate, together they avoid
collapse (§3.1 "Avoiding collapse", §5.3). Unlike BYOL (byol.py) there is no predictor, and the
loss is a cross-entropy between distributions over K = out_dim dimensions
(`losses.dino_distillation`), averaged over every (global crop, other crop) pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.dist import gather_nograd
from selfsup.heads import DINOHead
from selfsup.losses import dino_distillation
from selfsup.methods.base import Method
from selfsup.params import Group, check_method
from selfsup.registry import METHODS
from selfsup.schedules import cosine_ramp, linear_warmup
from selfsup.step import Progress, Views
from selfsup.target import EMA, TARGET_SETTINGS


@METHODS.register("dino")
class DINO(Method):
    """DINO: a student matches an EMA teacher's centred, sharpened distribution over crops."""

    target_settings = TARGET_SETTINGS  # momentum: its own EMA, as published (target.py)
    uses_small_views = True  # the local crops (§3.1, multi-crop)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        out_dim: int = 65536,  # K of §3.1 "Network architecture" (code --out_dim)
        hidden: int = 2048,  # the head's MLP width (§3.1)
        bottleneck: int = 256,  # before the L2 normalisation (code DINOHead)
        head_layers: int = 3,  # "3-layer MLP" (§3.1)
        use_bn_in_head: bool = False,  # ViTs: no BN anywhere (§3.1); an option for ResNets
        norm_last_layer: bool = True,  # the last layer's row norms fixed at 1 (code default)
        momentum: float = 0.996,  # λ; cosine from 0.996 to 1 during training (§3.1)
        final_momentum: float = 1.0,
        student_temp: float = 0.1,  # τ_s (§3.2 "Implementation details")
        teacher_temp: float = 0.04,  # τ_t, linear warm-up from 0.04 ... (§3.2)
        final_teacher_temp: float = 0.07,  # ... to 0.07 ...
        teacher_temp_warmup_epochs: float = 30,  # ... over the first 30 epochs (§3.2)
        center_momentum: float = 0.9,  # m of c ← m·c + (1 − m)·batch mean (eq. 4; code)
        freeze_last_layer_epochs: float = 1,  # last layer not updated (code --freeze_last_layer)
    ) -> None:
        check_method(
            out_dim=out_dim, hidden=hidden, bottleneck=bottleneck, head_layers=head_layers,
            student_temp=student_temp, teacher_temp=teacher_temp,
            final_teacher_temp=final_teacher_temp, momentum=momentum,
            final_momentum=final_momentum, center_momentum=center_momentum,
            teacher_temp_warmup_epochs=teacher_temp_warmup_epochs,
            freeze_last_layer_epochs=freeze_last_layer_epochs,
        )  # fmt: skip
        super().__init__(backbone)
        self.head = DINOHead(
            backbone.num_features, out_dim, hidden=hidden, bottleneck=bottleneck,
            layers=head_layers, use_bn=use_bn_in_head, norm_last_layer=norm_last_layer,
        )  # fmt: skip
        self.target = EMA(self.backbone, self.head)  # the teacher: backbone and head
        for module in self.target.copies.modules():  # the code builds the teacher without
            if isinstance(getattr(module, "drop_path", None), float):  # stochastic depth
                module.drop_path = 0.0
        self.register_buffer("center", torch.zeros(out_dim))  # c; persistent: resumes exactly
        self.momentum, self.final_momentum = momentum, final_momentum
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.teacher_temp, self.final_teacher_temp = teacher_temp, final_teacher_temp
        self.teacher_temp_warmup_epochs = teacher_temp_warmup_epochs
        self.freeze_last_layer_epochs = freeze_last_layer_epochs

    def teacher_temperature(self, epoch: float) -> float:
        """τ_t at `epoch`: linear from teacher_temp to final_teacher_temp, then constant."""
        if self.teacher_temp_warmup_epochs == 0:
            return self.final_teacher_temp
        fraction = epoch / self.teacher_temp_warmup_epochs
        return linear_warmup(self.teacher_temp, self.final_teacher_temp, fraction)

    def forward(self, views: Views, progress: Progress) -> dict[str, Tensor]:
        crops = views.large + views.small  # global crops first: student[i] is teacher[i]'s crop
        # One head batch over all crops (BN in the head sees them together), as the code's
        # MultiCropWrapper; the backbone runs once per crop size (`encode`).
        student = self.head(torch.cat(self.encode(crops))).chunk(len(crops))  # V × (N, K)
        teacher = self.target(torch.cat(views.large))  # (G·N, K), no gradient
        temperature = self.teacher_temperature(progress.epoch)
        loss = dino_distillation(
            list(student), list(teacher.chunk(len(views.large))), self.center,
            self.student_temp, temperature,
        )  # fmt: skip
        with torch.no_grad():
            teacher = teacher.float()
            target = F.softmax((teacher - self.center) / temperature, dim=1)
            # log K for a uniform target, 0 for one-hot: both ends are collapse (§5.3, Fig. 7)
            entropy = -(target * target.clamp_min(1e-12).log()).sum(dim=1).mean()
        return {
            "loss": loss,
            "teacher_entropy": entropy,
            "teacher_temp": loss.new_tensor(temperature),
            "teacher_mean": teacher.mean(dim=0)[None],  # (1, K): the centre's update, after_step
        }

    def after_step(self, progress: Progress, out: dict[str, Tensor]) -> None:
        # c ← m·c + (1 − m)·mean of the teacher outputs of the whole batch, every process's
        # (eq. 4); the processes' batches are equal, so the mean of their means is that mean.
        batch_center = gather_nograd(out["teacher_mean"]).mean(dim=0)
        self.center.lerp_(batch_center, 1 - self.center_momentum)
        self.target.update(cosine_ramp(self.momentum, self.final_momentum, progress.fraction))

    def parameter_groups(self) -> dict[str, Group]:
        # The last layer gets no update at all during the first epoch (code: cancel gradients of
        # "last_layer", "helps training"); the engine drops its gradients, so no decay either.
        if self.freeze_last_layer_epochs == 0:
            return {}
        return {"head.last_layer": Group(frozen_epochs=self.freeze_last_layer_epochs)}
