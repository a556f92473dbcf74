"""Decoupled KD: target-class and non-target-class parts of KD with their own weights, ramped in."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext
from pipeline.distill.losses import dkd_loss
from pipeline.distill.offline.common import ramp
from pipeline.distill.registry import register_method


class DKDConfig(Strict):
    """Zhao et al. 2022, "Decoupled Knowledge Distillation"."""

    alpha: float = Field(1.0, ge=0.0, description="weight of target-class KD (TCKD)")
    beta: float = Field(8.0, ge=0.0, description="weight of non-target-class KD (NCKD); 6 or 2 for some pairs")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1.0, ge=0.0)
    warmup_epochs: int = Field(20, ge=0, description="the DKD term ramps linearly to full weight over these epochs")


@register_method("dkd", DKDConfig, offline=True)
class DKD(Distiller):
    """Zhao et al. 2022: ``ce_weight * CE + ramp * dkd_loss(alpha * TCKD + beta * NCKD)``.

    ``ramp = min(1, (epoch + 1) / warmup_epochs)`` (mdistiller's warm-up, 20 epochs on
    CIFAR); it depends on the epoch alone, so a resumed run ramps identically. A
    logit method: its only extra cost over KD is a few soft-max reductions.
    """

    name = "dkd"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DKDConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg
        self.factor = ramp(0, cfg.warmup_epochs)

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        self.factor = ramp(epoch, self.cfg.warmup_epochs)

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits_t = self.teacher_forward(images)
        logits_s = self.student(images)
        c = self.cfg
        return logits_s, {
            "ce": c.ce_weight * F.cross_entropy(logits_s, labels),
            "dkd": self.factor * dkd_loss(logits_s, logits_t, labels, c.alpha, c.beta, c.temperature),
        }
