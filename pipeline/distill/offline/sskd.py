"""SSKD: rotation views, a teacher projection head trained first, and four selectively transferred terms."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext, Phase
from pipeline.distill.losses import kd_loss, target_rank, view_similarity, well_ranked
from pipeline.distill.offline.common import require_staged, setup_error
from pipeline.distill.registry import register_method

ROTATIONS = 4  # 0, 90, 180, 270 degrees


def rotated_views(images: Tensor) -> Tensor:
    """``[4B, C, H, W]``: the batch, then the batch rotated by 90, 180 and 270 degrees (block order)."""
    return torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)], dim=0)


def projection_head(dim: int) -> nn.Sequential:
    """SSKD's head on the pooled embedding: Linear(d, d) - ReLU - Linear(d, d)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


def _similarity(z: Tensor, b: int) -> Tensor:
    """Cosine similarities of the ``3B`` rotated views' projections with the ``B`` normal ones, ``[3B, B]``."""
    return view_similarity(z[b:], z[:b])


def _view_targets(b: int, device: torch.device) -> Tensor:
    """Row ``r`` of :func:`_similarity` (view ``r // B`` of image ``r % B``) matches normal image ``r % B``."""
    return torch.arange(b, device=device).repeat(ROTATIONS - 1)


class SSKDHead(Distiller):
    """Phase 1 of SSKD: the teacher's projection head learns, on the frozen backbone, to match views to sources.

    Loss: cross-entropy over the ``[3B, B]`` cosine-similarity matrix (each rotated
    view must be most similar to its own un-rotated image), as the reference's
    teacher head training. The logits handed to the loop are the teacher's, so the
    phase's accuracy curve is the teacher's own.
    """

    name = "sskd_head"

    def __init__(self, student: nn.Module, teacher: nn.Module, head: nn.Module) -> None:
        super().__init__(student, teacher)
        self.head = head

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.head.parameters())

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b = images.shape[0]
        feats = self.teacher_features(rotated_views(images))
        sim = _similarity(self.head(feats.embedding), b)
        return feats.logits[:b], {"head": F.cross_entropy(sim, _view_targets(b, images.device))}

    def eval_logits(self, images: Tensor) -> dict[str, Tensor]:
        return {"model": self.teacher_forward(images)}


class SSKDConfig(Strict):
    """Xu et al. 2020, "Knowledge Distillation Meets Self-Supervision" (rotation views, selective transfer)."""

    head_epochs: int = Field(60, ge=0, le=10000, description="epochs training the teacher's projection head on the frozen backbone (phase 1)")
    head_lr: float = Field(0.05, gt=0.0, le=10.0, description="lr of that phase")
    ce_weight: float = Field(0.1, ge=0.0, description="CE on the normal views")
    kd_weight: float = Field(0.9, ge=0.0, description="KD on the normal views")
    tf_weight: float = Field(2.7, ge=0.0, description="KD on the rotated views (transformation term)")
    ss_weight: float = Field(10.0, ge=0.0, description="KL of the view-similarity matrices (self-supervision term)")
    kd_temperature: float = Field(4.0, gt=0.0, le=100.0)
    tf_temperature: float = Field(4.0, gt=0.0, le=100.0)
    ss_temperature: float = Field(0.5, gt=0.0, le=100.0)
    tf_keep_wrong: float = Field(1.0, ge=0.0, le=1.0, description="share of the rotated views the teacher misclassifies kept for the tf term (best ranked first)")
    ss_keep_wrong: float = Field(0.75, ge=0.0, le=1.0, description="share of the views the teacher mismatches kept for the ss term")


@register_method("sskd", SSKDConfig, offline=True)
class SSKD(Distiller):
    """Xu et al. 2020: CE + KD on normal views, KD on rotated views, KL of view similarities; selective.

    Each batch is expanded to its four rotations (``4x`` the student and teacher
    work). Terms: ``ce_weight * CE(normal)``, ``kd_weight * KD(normal, T=4)``,
    ``tf_weight * KD(rotated views the teacher ranks well, T=4)`` and
    ``ss_weight * KD(similarity rows the teacher ranks well, T=0.5)``, where the
    similarity rows compare the projected embedding of every rotated view with the
    batch's normal views (student head vs teacher head). Well ranked: every view
    the teacher gets right plus the best-ranked ``keep_wrong`` share of the others
    (tf: 100 %, ss: 75 %). The teacher's head is trained first (phase
    ``sskd_head``, 60 epochs at lr 0.05, backbone frozen) and then frozen; the
    student's head trains with the student; both are dropped at deployment.
    The reference decays the head's lr at epochs 30 and 45; here the phase follows
    the run's schedule (constant under the CIFAR recipe's late milestones).
    """

    name = "sskd"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: SSKDConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg
        require_staged(self.name, ctx, student, teacher)
        if ctx.image_size < 2:
            raise setup_error(self.name, ctx, "rotation views need images of at least 2x2 pixels")
        self.head_s = projection_head(student.feature_info.embedding_dim)
        self.head_t = projection_head(teacher.feature_info.embedding_dim)

    def phases(self) -> list[Phase]:
        if self.cfg.head_epochs == 0:
            return []
        return [Phase("sskd_head", SSKDHead(self.student, self.teacher, self.head_t), self.cfg.head_epochs,
                      lr=self.cfg.head_lr)]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student and its head; the teacher's head is frozen after its phase."""
        return (p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("head_t."))

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        b = images.shape[0]
        views = rotated_views(images)
        with torch.no_grad():
            feats_t = self.teacher_features(views)
            z_t = self.head_t(feats_t.embedding)
        out = self.student.forward_features(views)
        z_s = self.head_s(out.embedding)
        logits_s, logits_t = out.logits, feats_t.logits

        view_labels = labels.repeat(ROTATIONS - 1)
        keep_tf = well_ranked(target_rank(logits_t[b:], view_labels), c.tf_keep_wrong)
        sim_s, sim_t = _similarity(z_s, b), _similarity(z_t, b)
        keep_ss = well_ranked(target_rank(sim_t, _view_targets(b, images.device)), c.ss_keep_wrong)

        zero = logits_s.new_zeros((), dtype=torch.float32)
        tf = kd_loss(logits_s[b:][keep_tf], logits_t[b:][keep_tf], c.tf_temperature) if keep_tf.numel() else zero
        ss = kd_loss(sim_s[keep_ss], sim_t[keep_ss], c.ss_temperature) if keep_ss.numel() else zero
        return logits_s[:b], {
            "ce": c.ce_weight * F.cross_entropy(logits_s[:b], labels),
            "kd": c.kd_weight * kd_loss(logits_s[:b], logits_t[:b], c.kd_temperature),
            "tf": c.tf_weight * tf,
            "ss": c.ss_weight * ss,
        }
