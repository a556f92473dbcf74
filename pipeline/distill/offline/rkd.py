"""Relational KD: the student keeps the teacher's distances and angles between the batch's embeddings."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext
from pipeline.distill.losses import rkd_loss
from pipeline.distill.offline.common import require_staged
from pipeline.distill.registry import register_method


class RKDConfig(Strict):
    """Park et al. 2019, "Relational Knowledge Distillation" (on the pooled embeddings)."""

    distance_weight: float = Field(25.0, ge=0.0)
    angle_weight: float = Field(50.0, ge=0.0)
    ce_weight: float = Field(1.0, ge=0.0)
    rkd_weight: float = Field(1.0, ge=0.0, description="overall multiplier of the relational loss")


@register_method("rkd", RKDConfig, offline=True)
class RKD(Distiller):
    """Park et al. 2019: ``ce_weight * CE + rkd_weight * (25 * distance + 50 * angle)`` on pooled embeddings.

    Relations are scale-free, so embeddings of different widths compare without any
    extra module (CRD benchmark: ``-a 0 -b 1``). The batch must hold at least two
    samples (the loop drops a lone last sample).
    """

    name = "rkd"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: RKDConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg
        require_staged(self.name, ctx, student, teacher)

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        emb_t = self.teacher_features(images).embedding
        out = self.student.forward_features(images)
        rel = rkd_loss(out.embedding, emb_t, self.cfg.distance_weight, self.cfg.angle_weight)
        return out.logits, {
            "ce": self.cfg.ce_weight * F.cross_entropy(out.logits, labels),
            "rkd": self.cfg.rkd_weight * rel,
        }
