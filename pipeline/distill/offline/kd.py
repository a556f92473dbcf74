"""Hinton KD: the student matches the teacher's temperature-softened class distribution."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext
from pipeline.distill.losses import hinton_terms
from pipeline.distill.registry import register_method


class KDConfig(Strict):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""

    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(0.1, ge=0.0)
    kd_weight: float = Field(0.9, ge=0.0)


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
