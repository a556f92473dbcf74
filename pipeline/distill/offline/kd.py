"""Hinton KD: the student matches the teacher's temperature-softened class distribution."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.config import KDConfig
from pipeline.distill.base import Distiller, MethodContext
from pipeline.distill.losses import hinton_terms
from pipeline.distill.registry import register_method


@register_method("kd", KDConfig, offline=True)
class KD(Distiller):
    """``ce_weight * CE(student, y) + kd_weight * kd_loss(student, teacher, T)``."""

    name = "kd"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: KDConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits_t = self.teacher_forward(images)
        logits_s = self.student(images)
        c = self.cfg
        return logits_s, hinton_terms(logits_s, logits_t, labels, c.ce_weight, c.kd_weight, c.temperature)
