"""Optimizer and learning-rate schedule built from a :class:`~pipeline.config.TrainConfig`."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

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


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum, Nesterov and weight decay over the trainable parameters."""
    o = cfg.optimizer
    return torch.optim.SGD(
        [p for p in params if p.requires_grad],
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov and o.momentum > 0,
        weight_decay=o.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch LambdaLR following :func:`lr_factor` (its state holds only counters)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg.schedule, cfg.epochs, e))
