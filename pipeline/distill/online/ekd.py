"""EKD: an evolutionary teacher trained from scratch alongside the student (our reconstruction from the abstract)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.config.training import check_model_name
from pipeline.distill.base import MethodContext, MethodSetupError
from pipeline.distill.losses import hint_loss, kd_loss, log_mean_probs
from pipeline.distill.online.common import OnlineDistiller, build_like
from pipeline.distill.registry import register_method
from pipeline.models import feature_shapes


class GuidedModule(nn.Module):
    """1x1 convolution + BN from a student stage's channels to the paired teacher stage's (FitNets-style adapter)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def feature_mimic_loss(guided_s: Tensor, feat_t: Tensor) -> Tensor:
    """:func:`hint_loss` (mean squared error) after average-pooling the larger map to the smaller one's size."""
    hs, ht = guided_s.shape[2:], feat_t.shape[2:]
    if hs != ht:
        side = (min(hs[0], ht[0]), min(hs[1], ht[1]))
        guided_s = F.adaptive_avg_pool2d(guided_s, side) if hs != side else guided_s
        feat_t = F.adaptive_avg_pool2d(feat_t, side) if ht != side else feat_t
    return hint_loss(guided_s, feat_t)


class EKDConfig(Strict):
    """EKD, "Evolutionary Knowledge Distillation" (Zhang et al. 2021): our reconstruction from the abstract (docs/online.md)."""

    teacher_model: str | None = Field(None, description="architecture of the evolving teacher, trained from scratch with the student; null = teacher.model")
    stages: int | None = Field(None, ge=1, le=16, description="pair the deepest N stages through guided modules; null = every stage both networks have")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1.0, ge=0.0, description="student CE on labels")
    teacher_ce_weight: float = Field(1.0, ge=0.0, description="teacher CE on labels (its only loss)")
    kd_weight: float = Field(1.0, ge=0.0, description="student T^2 KL to the teacher's softened outputs (ramped)")
    feat_weight: float = Field(1.0, ge=0.0, description="student MSE to the teacher's stage features through the guided modules, summed over stages (ramped)")
    rampup_epochs: int | None = Field(None, ge=0, description="sigmoid ramp of the KD and feature terms; null = round(80/300 x epochs); 0 = none")

    @field_validator("teacher_model")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        return None if v is None else check_model_name(v)


@register_method("ekd", EKDConfig, offline=False)
class EKD(OnlineDistiller):
    """Evolutionary Knowledge Distillation (Zhang et al. 2021), OUR RECONSTRUCTION: only the abstract is available.

    What the abstract says, and how each part is realised here:

    - "Instead of a fixed pre-trained teacher, an evolutionary teacher is learned
      online": a teacher network (``teacher_model``, default the pipeline's
      ``teacher.model``, i.e. a larger/wider zoo network) starts from scratch and is
      trained in the same run, by the same optimizer, on labels only
      (``teacher_ce_weight * CE``); nothing flows back from the student into it
      (every teacher quantity in a student loss is detached). "Evolutionary"/"grows"
      is read as the teacher's knowledge growing as it trains, which the student
      follows epoch by epoch; the architecture itself does not change during training
      (no network morphism).
    - "consistently transfers intermediate knowledge ... several simple guided modules
      are introduced between corresponding teacher-student blocks": stages are paired
      by position from the deepest (``stages``, default every stage both networks
      have); each pair gets a guided module, a 1x1 conv + BN adapter from the student
      stage's channels to the teacher's (trained with the student; not deployed). The
      student mimics the teacher's post-activation stage output with the mean squared
      error (spatial sizes matched by average pooling), summed over the pairs.
    - the student "captures its growth process" and mimics softened outputs: Hinton KD
      at ``temperature`` (4, as the pipeline's KD) to the teacher's current logits.

    Student loss ``ce_weight * CE + ramp * (kd_weight * T^2 KL + feat_weight * sum MSE)``;
    the ramp (our addition: a from-scratch teacher is noise at first) is the ONE/OKDDip
    sigmoid ramp. The ensemble head averages teacher and student probabilities; the
    student is deployed.
    """

    name = "ekd"

    def __init__(self, student: nn.Module, cfg: EKDConfig, ctx: MethodContext) -> None:
        teacher_arch = cfg.teacher_model or ctx.teacher_arch
        if teacher_arch is None:
            raise MethodSetupError("ekd: no teacher architecture; set online.ekd.teacher_model (or teacher.model)")
        super().__init__(student, cfg, ctx)
        self.teacher_arch = teacher_arch
        self.evolving_teacher = build_like(ctx, teacher_arch)
        shape_s = feature_shapes(student, ctx.in_channels, ctx.image_size)["stages"]
        shape_t = feature_shapes(self.evolving_teacher, ctx.in_channels, ctx.image_size)["stages"]
        most = min(len(shape_s), len(shape_t))
        n = most if cfg.stages is None else cfg.stages
        if n > most:
            raise MethodSetupError(
                f"ekd: stages={n} but {ctx.student_arch} has {len(shape_s)} stages and {teacher_arch} {len(shape_t)}; allowed: 1..{most}"
            )
        self.pairs: list[tuple[int, int]] = [(len(shape_s) - n + k, len(shape_t) - n + k) for k in range(n)]
        self.guides = nn.ModuleList(GuidedModule(shape_s[i][0], shape_t[j][0]) for i, j in self.pairs)

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        fs = self.student.forward_features(images)
        ft = self.evolving_teacher.forward_features(images)
        cfg, ramp = self.cfg, self.ramp()
        feat = sum(feature_mimic_loss(guide(fs.stages[i]), ft.stages[j].detach())
                   for guide, (i, j) in zip(self.guides, self.pairs, strict=True))
        return fs.logits, {
            "ce": cfg.ce_weight * F.cross_entropy(fs.logits, labels),
            "ce_teacher": cfg.teacher_ce_weight * F.cross_entropy(ft.logits, labels),
            "kd": ramp * cfg.kd_weight * kd_loss(fs.logits, ft.logits.detach(), cfg.temperature),
            "feat": ramp * cfg.feat_weight * feat,
        }

    def heads(self, images: Tensor) -> dict[str, Tensor]:
        z_s, z_t = self.student(images), self.evolving_teacher(images)
        return {"student": z_s, "teacher": z_t, "ensemble": log_mean_probs([z_s, z_t])}

    def candidates(self) -> list[str]:
        return ["student"]

    def extract(self, name: str) -> nn.Module:
        if name != "student":
            raise ValueError(f"ekd deploys its student, not {name!r}")
        return self.student
