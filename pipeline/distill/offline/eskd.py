"""ESKD: distil from an early checkpoint of the teacher's route, and/or stop the KD term early."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext, freeze
from pipeline.distill.losses import kd_loss
from pipeline.distill.offline.common import (
    build_route_network,
    load_route_weights,
    nearest_epoch,
    route_checkpoints,
    setup_error,
)
from pipeline.distill.registry import register_method


class ESKDConfig(Strict):
    """Cho & Hariharan 2019, "On the Efficacy of Knowledge Distillation" (early-stopped teacher / early-stopped KD)."""

    teacher_epoch: int | None = Field(None, ge=1, description="route checkpoint (teacher epoch) to distil from; null = the one nearest half the teacher's training")
    stop_epoch: int | None = Field(None, ge=1, description="student epoch after which the KD term stops (plain CE from then on); null = never")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(0.1, ge=0.0)
    kd_weight: float = Field(0.9, ge=0.0)


@register_method("eskd", ESKDConfig, offline=True)
class ESKD(Distiller):
    """Cho & Hariharan 2019: KD from an early-stopped teacher; optionally KD only until ``stop_epoch``.

    The teacher is the route checkpoint ``runs/teacher/route/epoch_<teacher_epoch>.pt``
    (``null``: the checkpoint nearest half the teacher's training, our default), a
    frozen network of the teacher's architecture; the converged teacher handed in is
    not used (it is the last route checkpoint). Until ``stop_epoch`` (student epochs,
    1-based, inclusive) the loss is ``ce_weight * CE + kd_weight * KD``; after it, plain
    cross-entropy (weight 1) and no teacher forward at all; the switch depends on
    the epoch alone, so resume is exact.
    """

    name = "eskd"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: ESKDConfig, ctx: MethodContext) -> None:
        route = route_checkpoints(self.name, ctx)
        epochs = list(route)
        if cfg.teacher_epoch is None:
            chosen = nearest_epoch(epochs, epochs[-1] / 2)
        elif cfg.teacher_epoch in route:
            chosen = cfg.teacher_epoch
        else:
            raise setup_error(self.name, ctx, f"eskd.teacher_epoch={cfg.teacher_epoch} is not a route checkpoint; "
                              f"available teacher epochs: {epochs}")
        if cfg.stop_epoch is not None and cfg.stop_epoch > ctx.epochs:
            raise setup_error(self.name, ctx, f"eskd.stop_epoch={cfg.stop_epoch} is beyond the student's "
                              f"{ctx.epochs} epochs")
        freeze(teacher)  # unused unless it is the chosen checkpoint, but frozen like every teacher
        if chosen == epochs[-1]:
            early = teacher  # the last route checkpoint is the converged teacher
        else:
            early = build_route_network(self.name, ctx)
            load_route_weights(self.name, ctx, early, route[chosen])
        super().__init__(student, early)
        self.cfg = cfg
        self.teacher_epoch = chosen
        self.distilling = True

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        self.distilling = self.cfg.stop_epoch is None or epoch < self.cfg.stop_epoch

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits_s = self.student(images)
        ce = F.cross_entropy(logits_s, labels)
        if not self.distilling:
            return logits_s, {"ce": ce, "kd": torch.zeros((), device=logits_s.device)}
        logits_t = self.teacher_forward(images)
        return logits_s, {
            "ce": self.cfg.ce_weight * ce,
            "kd": self.cfg.kd_weight * kd_loss(logits_s, logits_t, self.cfg.temperature),
        }

    def finalize(self, history: list[dict[str, float]]) -> dict[str, Any]:
        return {"teacher_epoch": self.teacher_epoch, "kd_stopped_after_epoch": self.cfg.stop_epoch}
