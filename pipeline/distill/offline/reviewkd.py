"""ReviewKD: student stages fused deep-to-shallow by attention-based fusion, compared with the teacher's by HCL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext
from pipeline.distill.losses import hcl_loss
from pipeline.distill.offline.common import paired_stages, probe, ramp, require_preact, require_staged
from pipeline.distill.registry import register_method


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused result of the deeper levels.

    ``x -> 1x1 conv + BN (mid channels)``; where a deeper residual ``y`` exists it is
    resized (nearest) to ``x``'s side, and the two are mixed with two per-pixel
    sigmoid attention maps computed from their concatenation. The mix is resized to
    the teacher's side of this level and mapped by a 3x3 conv + BN to the teacher's
    channels. Returns ``(output for the loss, mix passed to the next shallower level)``.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att is not None and residual is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            w = self.att(torch.cat([x, residual], dim=1))
            x = x * w[:, 0:1] + residual * w[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKDConfig(Strict):
    """Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (ABF fusion + hierarchical context loss)."""

    review_weight: float = Field(5.0, ge=0.0, description="weight of the HCL loss (5 for most pairs, 8 shufflenetv2, 0.6 resnet20)")
    ce_weight: float = Field(1.0, ge=0.0)
    warmup_epochs: int = Field(20, ge=0, description="the review term ramps linearly to full weight over these epochs")
    stages: int = Field(4, ge=1, le=16, description="review the deepest N stages (plus the pooled embedding)")
    max_mid_channels: int = Field(512, ge=1, description="ABF width = min(this, student embedding width)")
    student_preact: bool = Field(False, description="read the student's pre-activation stage outputs (the teacher's are always pre-activation)")


@register_method("reviewkd", ReviewKDConfig, offline=True)
class ReviewKD(Distiller):
    """Chen et al. 2021: ``ce_weight * CE + ramp * review_weight * hcl_loss(ABF(student levels), teacher levels)``.

    Levels are the deepest ``stages`` paired stages plus the pooled embedding (as a
    1x1 map). Student levels (post-activation, or pre-activation with
    ``student_preact``) are fused from the deepest to the shallowest by one
    :class:`ABF` each (width ``min(max_mid_channels, student embedding width)``), and
    each output, resized to the teacher's side and channels, is compared with the
    teacher's *pre-activation* level by the hierarchical context loss. Channels and
    sides come from the models' feature metadata, so any pair with stages works; the
    settings equal the reference's per-pair tables on the CIFAR zoo. The ABFs train
    with the student and are dropped at deployment. The ramp is 20 epochs.
    """

    name = "reviewkd"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: ReviewKDConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg
        require_staged(self.name, ctx, student, teacher)
        s_shapes, t_shapes = probe(student, ctx), probe(teacher, ctx)
        s_key = "preact" if cfg.student_preact else "stages"
        self.pairs = paired_stages(len(s_shapes[s_key]), len(t_shapes["preact"]), cfg.stages)
        require_preact(self.name, ctx, "teacher", teacher, [j for _, j in self.pairs])
        if cfg.student_preact:
            require_preact(self.name, ctx, "student", student, [i for i, _ in self.pairs])
        s_levels = [s_shapes[s_key][i] for i, _ in self.pairs] + [(student.feature_info.embedding_dim, 1, 1)]
        t_levels = [t_shapes["preact"][j] for _, j in self.pairs] + [(teacher.feature_info.embedding_dim, 1, 1)]
        mid = min(cfg.max_mid_channels, student.feature_info.embedding_dim)
        last = len(s_levels) - 1
        # abfs[k] serves level k (shallow to deep); the deepest level has nothing deeper to fuse.
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=k < last) for k, (s, t) in enumerate(zip(s_levels, t_levels, strict=True)))
        self.out_sizes = [(t[1], t[2]) for t in t_levels]
        self.factor = ramp(0, cfg.warmup_epochs)

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        self.factor = ramp(epoch, self.cfg.warmup_epochs)

    def _levels(self, stages: list[Tensor], embedding: Tensor, student: bool) -> list[Tensor]:
        idx = [i if student else j for i, j in self.pairs]
        return [stages[k] for k in idx] + [embedding[:, :, None, None]]

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats_t = self.teacher_features(images)
        out = self.student.forward_features(images)
        s_stages = out.preact if self.cfg.student_preact else out.stages
        levels_s = self._levels(s_stages, out.embedding, student=True)
        levels_t = self._levels(feats_t.preact, feats_t.embedding, student=False)
        fused: list[Tensor] = [levels_s[0]] * len(levels_s)
        residual: Tensor | None = None
        for k in range(len(levels_s) - 1, -1, -1):
            fused[k], residual = self.abfs[k](levels_s[k], residual, self.out_sizes[k])
        review = hcl_loss(fused, levels_t)
        return out.logits, {
            "ce": self.cfg.ce_weight * F.cross_entropy(out.logits, labels),
            "review": self.factor * self.cfg.review_weight * review,
        }
