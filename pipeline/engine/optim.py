"""Optimizer and learning-rate schedule built from a :class:`~pipeline.config.TrainConfig`."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config.training import ScheduleConfig, TrainConfig


def lr_factor(schedule: ScheduleConfig, epochs: int, epoch: int) -> float:
    """Multiplier of the base lr for a 0-based epoch: linear warm-up, then multistep/cosine/constant."""
    w = schedule.warmup_epochs
    if epoch < w:
        return (epoch + 1) / (w + 1)
    if schedule.name == "multistep":
        return schedule.gamma ** bisect.bisect_right(schedule.milestones, epoch)
    if schedule.name == "cosine":
        span = max(1, epochs - w)
        progress = (epoch - w) / span
        floor = schedule.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


@dataclass(frozen=True)
class Finetune:
    """Parameters loaded from pretrained weights, and how they train.

    They run at ``lr_scale`` times the schedule's lr, and not at all (lr 0) during
    the first ``freeze_epochs`` epochs; every other parameter (a new head, method
    modules) follows the schedule itself.
    """

    pretrained: tuple[nn.Parameter, ...]
    lr_scale: float = 1.0
    freeze_epochs: int = 0

    def factor(self, base: float, epoch: int) -> float:
        """The pretrained group's lr multiplier at a 0-based epoch, given the schedule's ``base``."""
        return 0.0 if epoch < self.freeze_epochs else self.lr_scale * base


def _groups(params: Iterable[nn.Parameter], finetune: Finetune | None) -> list[list[nn.Parameter]]:
    """The trainable parameters as [others, pretrained] (empty groups left out)."""
    trainable = [p for p in params if p.requires_grad]
    if finetune is None:
        return [trainable]
    ids = {id(p) for p in finetune.pretrained}
    groups = [[p for p in trainable if id(p) not in ids], [p for p in trainable if id(p) in ids]]
    return [g for g in groups if g]


def build_optimizer(
    params: Iterable[nn.Parameter], cfg: TrainConfig, finetune: Finetune | None = None
) -> torch.optim.Optimizer:
    """SGD with momentum, Nesterov and weight decay over the trainable parameters.

    With ``finetune`` the pretrained parameters form a second group (after the
    others), whose lr :func:`build_scheduler` scales.
    """
    o = cfg.optimizer
    return torch.optim.SGD(
        [{"params": g} for g in _groups(params, finetune)],
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov and o.momentum > 0,
        weight_decay=o.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, finetune: Finetune | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch LambdaLR following :func:`lr_factor` (its state holds only counters).

    The pretrained group of a ``finetune`` optimizer follows :meth:`Finetune.factor`.
    """
    def schedule(e: int) -> float:
        return lr_factor(cfg.schedule, cfg.epochs, e)

    if finetune is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ids = {id(p) for p in finetune.pretrained}
    lambdas = [(lambda e: finetune.factor(schedule(e), e)) if any(id(p) in ids for p in g["params"]) else schedule
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
