"""FitNets: the student's guided stage, through a learned regressor, regresses onto the teacher's hint stage."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext
from pipeline.distill.losses import hint_loss
from pipeline.distill.offline.common import ConvRegressor, probe, require_staged, resolve_stage, setup_error
from pipeline.distill.registry import register_method


class FitNetsConfig(Strict):
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (trained jointly with CE, as RepDistiller/mdistiller)."""

    student_stage: int | None = Field(None, description="student stage regressed onto the hint (Python index, negative counts from the end); null = the middle stage")
    teacher_stage: int | None = Field(None, description="teacher stage giving the hint; null = the middle stage")
    ce_weight: float = Field(1.0, ge=0.0)
    hint_weight: float = Field(100.0, ge=0.0, description="weight of the MSE between regressed student and teacher features")


@register_method("fitnets", FitNetsConfig, offline=True)
class FitNets(Distiller):
    """Romero et al. 2015: ``ce_weight * CE + hint_weight * MSE(regressor(f_s), f_t)`` on one stage pair.

    As in RepDistiller and mdistiller (CRD benchmark), hint regression is trained
    jointly with the cross-entropy instead of the paper's separate hint stage. The
    regressor (conv + BN + ReLU, :class:`ConvRegressor`) trains with the student and
    is dropped at deployment. Both sides use post-activation stage outputs; the
    default pair is the middle stage of each network (mdistiller's ``HINT_LAYER: 2``).
    """

    name = "fitnets"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: FitNetsConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg
        require_staged(self.name, ctx, student, teacher)
        s_shapes, t_shapes = probe(student, ctx)["stages"], probe(teacher, ctx)["stages"]
        self.s_index = resolve_stage(self.name, ctx, "student", cfg.student_stage, len(s_shapes))
        self.t_index = resolve_stage(self.name, ctx, "teacher", cfg.teacher_stage, len(t_shapes))
        s_shape, t_shape = s_shapes[self.s_index], t_shapes[self.t_index]
        if not ConvRegressor.fits(s_shape, t_shape):
            raise setup_error(
                self.name, ctx,
                f"student stage {self.s_index} {tuple(s_shape)} cannot be regressed onto teacher stage {self.t_index} "
                f"{tuple(t_shape)}: the student map must be at least as large as the teacher's or exactly half its side; "
                "pick other stages with distill.fitnets.student_stage / teacher_stage",
            )
        self.regressor = ConvRegressor(s_shape, t_shape, relu=True)

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        hint = self.teacher_features(images).stages[self.t_index]
        out = self.student.forward_features(images)
        guided = self.regressor(out.stages[self.s_index])
        return out.logits, {
            "ce": self.cfg.ce_weight * F.cross_entropy(out.logits, labels),
            "hint": self.cfg.hint_weight * hint_loss(guided, hint),
        }
