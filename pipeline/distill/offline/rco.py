"""RCO: the student follows anchors taken from the teacher's training route, from early to converged."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext
from pipeline.distill.losses import kd_loss
from pipeline.distill.offline.common import (
    build_route_network,
    epochs_of,
    equal_interval_epochs,
    load_route_weights,
    route_checkpoints,
    setup_error,
)
from pipeline.distill.registry import register_method


class RCOConfig(Strict):
    """Jin et al. 2019, "Knowledge Distillation via Route Constrained Optimization" (anchors from the teacher's route)."""

    strategy: Literal["equal", "greedy"] = Field("equal", description="equal: anchors at equal teacher-epoch intervals, switched at equal student-epoch intervals; greedy: step to the next route checkpoint once the student follows the current one")
    num_anchors: int = Field(4, ge=1, le=1000, description="equal strategy: anchors taken from the route (the last is the converged teacher)")
    route_span: float = Field(0.6, gt=0.0, le=1.0, description="share of the student's epochs spent walking the route; the converged teacher supervises the rest")
    greedy_threshold: float = Field(0.5, gt=0.0, description="greedy: move on when the epoch's mean KD term (T^2 KL) to the current anchor has fallen to this share of its value in the first epoch on that anchor")
    min_anchor_epochs: int = Field(1, ge=1, description="greedy: epochs on an anchor before it may move on")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(0.1, ge=0.0)
    kd_weight: float = Field(0.9, ge=0.0)


@register_method("rco", RCOConfig, offline=True)
class RCO(Distiller):
    """Jin et al. 2019: KD (``ce_weight * CE + kd_weight * KD``) from a sequence of route anchors.

    Anchors are teacher checkpoints of ``runs/teacher/route/epoch_XXXX.pt`` (kept every
    ``teacher.route_every`` epochs), easy (early) to hard; the last anchor is always the
    converged teacher itself. The student walks the route during the first
    ``route_span`` of its epochs and is supervised by the converged teacher for the rest.

    Our reconstruction (the paper gives neither thresholds nor switch epochs):

    - ``equal``: ``num_anchors`` anchors at equal teacher-epoch intervals (targets
      ``E_t * k / n`` snapped to the nearest checkpoint); the first ``n - 1`` share the
      route span equally, e.g. teacher 240 epochs, 4 anchors -> teacher epochs 60, 120,
      180, 240; student of 240 epochs, span 0.6 -> switches at epochs 48, 96, 144.
    - ``greedy``: every route checkpoint is a candidate, in order. The divergence is
      the epoch's mean KD term to the current anchor (``T^2 KL``, the logged
      ``train/kd`` divided by ``kd_weight``). At the start of an epoch the student
      moves to the next checkpoint when, after at least ``min_anchor_epochs`` epochs on
      the current one, its last-epoch divergence is at most ``greedy_threshold`` times
      its divergence in the first epoch on that anchor (a relative threshold, so one
      default serves 10 and 1000 classes alike); at the end of the span it jumps to
      the converged teacher.

    The anchor in use is a function of the epoch (equal) or of buffers that are part
    of the trainable state (greedy: current anchor, epochs on it, the first and the
    running divergence), so a resumed run switches exactly as an uninterrupted one.
    Cost per step equals KD's (one frozen forward); an anchor is loaded once per switch.
    """

    name = "rco"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: RCOConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg
        self.ctx = ctx
        route = route_checkpoints(self.name, ctx)
        epochs = list(route)
        if cfg.strategy == "equal":
            epochs = equal_interval_epochs(epochs, cfg.num_anchors)
        self.anchor_epochs: list[int] = epochs
        self.anchor_paths = [route[e] for e in epochs]
        self.span_epochs = epochs_of(cfg.route_span, ctx.epochs)
        if len(epochs) > 1:
            self.anchor = build_route_network(self.name, ctx)
            # fail at start, not at the first switch, on a route file that does not fit the teacher
            for path in self.anchor_paths[:-1]:
                load_route_weights(self.name, ctx, self.anchor, path)
        else:
            self.anchor = None
        if len(epochs) > 1 and self.span_epochs < len(epochs) - 1 and cfg.strategy == "equal":
            raise setup_error(
                self.name, ctx,
                f"{len(epochs) - 1} intermediate anchors do not fit in {self.span_epochs} route epochs "
                f"(route_span {cfg.route_span} of {ctx.epochs} student epochs); lower rco.num_anchors",
            )
        n = len(epochs)
        self.register_buffer("current", torch.zeros((), dtype=torch.long))
        self.register_buffer("on_anchor", torch.zeros((), dtype=torch.long))
        self.register_buffer("kd_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("kd_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("kd_first", torch.zeros((), dtype=torch.float64))
        self.register_buffer("started", torch.full((n,), -1, dtype=torch.long))
        self._loaded = -1  # which anchor the `anchor` network holds (not state: re-derived on resume)

    # -- anchor schedule ---------------------------------------------------------------
    def frozen_prefixes(self) -> tuple[str, ...]:
        return super().frozen_prefixes() + ("anchor.",)

    def _equal_index(self, epoch: int) -> int:
        n = len(self.anchor_epochs)
        if n == 1 or epoch >= self.span_epochs:
            return n - 1
        return min(n - 2, epoch * (n - 1) // self.span_epochs)

    def _greedy_index(self, epoch: int) -> int:
        n = len(self.anchor_epochs)
        cur = int(self.current)
        if epoch == 0 or cur == n - 1:
            return cur
        if epoch >= self.span_epochs:
            return n - 1
        if int(self.kd_count) == 0 or int(self.on_anchor) < self.cfg.min_anchor_epochs:
            return cur
        divergence = float(self.kd_sum) / int(self.kd_count)
        return cur + 1 if divergence <= self.cfg.greedy_threshold * float(self.kd_first) else cur

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        if self.cfg.strategy == "greedy" and int(self.on_anchor) == 1 and int(self.kd_count) > 0:
            self.kd_first.fill_(float(self.kd_sum) / int(self.kd_count))  # the first epoch on this anchor
        idx = self._equal_index(epoch) if self.cfg.strategy == "equal" else self._greedy_index(epoch)
        if idx != int(self.current) or epoch == 0:
            self.on_anchor.zero_()
        if int(self.started[idx]) < 0:
            self.started[idx] = epoch
        self.current.fill_(idx)
        self.on_anchor += 1
        self.kd_sum.zero_()
        self.kd_count.zero_()
        if idx < len(self.anchor_epochs) - 1 and self._loaded != idx:
            assert self.anchor is not None
            load_route_weights(self.name, self.ctx, self.anchor, self.anchor_paths[idx])
            self._loaded = idx

    def rank_summed_buffers(self) -> tuple[str, ...]:
        # the greedy switch must judge the divergence over every sample of the epoch, not one rank's shard
        return ("kd_sum", "kd_count")

    def _anchor_net(self) -> nn.Module:
        idx = int(self.current)
        if idx == len(self.anchor_epochs) - 1:
            return self.teacher  # the converged teacher is the last anchor
        assert self.anchor is not None and self._loaded == idx, "on_epoch_start loads the anchor"
        return self.anchor

    # -- training ----------------------------------------------------------------------
    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            logits_t = self._anchor_net()(images)
        logits_s = self.student(images)
        kd = kd_loss(logits_s, logits_t, self.cfg.temperature)
        if self.training and self.cfg.strategy == "greedy":
            with torch.no_grad():
                self.kd_sum += kd.detach().double() * labels.shape[0]
                self.kd_count += labels.shape[0]
        return logits_s, {
            "ce": self.cfg.ce_weight * F.cross_entropy(logits_s, labels),
            "kd": self.cfg.kd_weight * kd,
        }

    def finalize(self, history: list[dict[str, float]]) -> dict[str, Any]:
        """Which teacher epochs served as anchors, and from which student epoch each was used (-1: skipped)."""
        return {"strategy": self.cfg.strategy, "anchor_teacher_epochs": self.anchor_epochs,
                "anchor_started_at_student_epoch": [int(e) + 1 if e >= 0 else -1 for e in self.started.tolist()]}
