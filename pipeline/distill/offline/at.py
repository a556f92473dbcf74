"""Attention transfer: the student matches the teacher's spatial attention maps, stage by stage."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext
from pipeline.distill.losses import at_loss
from pipeline.distill.offline.common import paired_stages, require_staged
from pipeline.distill.registry import register_method


class ATConfig(Strict):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"."""

    p: float = Field(2.0, gt=0.0, le=8.0, description="attention map = normalised channel mean of |f|^p")
    stages: int = Field(4, ge=1, le=16, description="pair the deepest N stages of both networks (the references skip VGG's first block)")
    ce_weight: float = Field(1.0, ge=0.0)
    at_weight: float = Field(1000.0, ge=0.0)


@register_method("at", ATConfig, offline=True)
class AT(Distiller):
    """Zagoruyko & Komodakis 2017: ``ce_weight * CE + at_weight * sum_stages at_loss(f_s, f_t, p)``.

    Post-activation stage outputs of the deepest ``stages`` pairs (aligned from the
    last stage backwards); maps of different sizes are pooled to the smaller one. No
    trainable extra module: attention maps need no channel match. Weight 1000 and
    p = 2 are the CRD-benchmark values.
    """

    name = "at"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: ATConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg
        require_staged(self.name, ctx, student, teacher)
        self.pairs = paired_stages(len(student.feature_info.stages), len(teacher.feature_info.stages), cfg.stages)

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats_t = self.teacher_features(images).stages
        out = self.student.forward_features(images)
        transfer = sum(at_loss(out.stages[i], feats_t[j], self.cfg.p) for i, j in self.pairs)
        return out.logits, {
            "ce": self.cfg.ce_weight * F.cross_entropy(out.logits, labels),
            "at": self.cfg.at_weight * transfer,
        }
