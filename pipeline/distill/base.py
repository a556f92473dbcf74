"""The ``Distiller`` contract shared by every training run.

A run (teacher, baseline, offline or online distillation) is a module that owns its
trainable networks and, where offline, a frozen teacher. ``forward(images, labels,
indices)`` returns the logits to score and a dict of named, already-weighted loss
terms; the training loop sums the terms and never needs to know the method.
:class:`Distiller` satisfies :class:`pipeline.engine.trainable.Trainable`, the protocol
the loop trains, without the engine importing anything from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.models.base import ModelOutput


class MethodSetupError(UserError, ValueError):
    """A method cannot work with the given models; the message names method, models and what is missing."""


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and stop its gradients (a frozen teacher, an anchor network)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@dataclass(frozen=True)
class MethodContext:
    """What a method may need to know about the run besides its networks and params."""

    student_arch: str
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    epochs: int
    teacher_arch: str | None = None
    teacher_dir: Path | None = None  # runs/teacher: model.pt and route/epoch_XXXX.pt


@dataclass
class Phase:
    """A preliminary training phase a method needs before its main run (e.g. AB's boundary
    initialisation, SSKD's teacher head). It runs through the same loop, with its own recipe,
    and is checkpointed/resumed like any run; ``task`` shares modules with the main task."""

    name: str
    task: Distiller
    epochs: int
    lr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Distiller(nn.Module):
    """Base of every training task; subclasses implement :meth:`losses`.

    ``teacher`` (optional) is frozen: eval mode, ``requires_grad=False``, excluded from
    the optimizer and from checkpoints, and run under ``no_grad``.
    """

    name = "base"

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            freeze(teacher)
        self.epoch = 0
        self.num_epochs = 1

    # -- what the loop calls -------------------------------------------------
    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits of the trained network and the named loss terms for one batch."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Hook for schedules inside a method (loss ramps, anchor switches)."""
        self.epoch, self.num_epochs = epoch, num_epochs

    def rank_summed_buffers(self) -> tuple[str, ...]:
        """Names of buffers that add up per-sample quantities (running sums, counts).

        Under DDP each rank sees its own shard, so at the end of every epoch the ranks'
        increases of these over the epoch are added up (giving the single-process
        value); every other buffer is taken from rank 0. None by default.
        """
        return ()

    def phases(self) -> list[Phase]:
        """Preliminary phases run (in order) before the main training; none by default."""
        return []

    def finalize(self, history: list[dict[str, float]]) -> dict[str, Any]:
        """Called once after training with the per-epoch history (e.g. to pick the peer to deploy).

        Returns facts worth recording in the run's train.json (empty by default).
        """
        return {}

    def eval_logits(self, images: Tensor) -> dict[str, Tensor]:
        """Logits scored on validation: ``model`` is the deployable network; methods may add heads."""
        return {"model": self.deployable()(images)}

    def deployable(self) -> nn.Module:
        """The single plain network that gets evaluated, exported and deployed."""
        return self.student

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes that are not trained and not checkpointed."""
        return ("teacher.",) if self.teacher is not None else ()

    def train(self, mode: bool = True) -> Distiller:
        """Train mode for the trained networks; frozen children (``frozen_prefixes``) stay in eval mode."""
        super().train(mode)
        frozen = self.frozen_prefixes()
        for name, child in self.named_children():
            if f"{name}." in frozen:
                child.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer updates (the student and any method heads)."""
        return (p for p in self.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything that changes during training: what a resume checkpoint must hold."""
        skip = self.frozen_prefixes()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`; strict on the trainable keys."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        skip = self.frozen_prefixes()
        missing = [k for k in missing if not k.startswith(skip)]
        if missing or unexpected:
            raise RuntimeError(f"state does not fit this run: missing {missing[:5]}, unexpected {unexpected[:5]}")

    @torch.no_grad()
    def teacher_forward(self, images: Tensor) -> Tensor:
        """Teacher logits, without building a graph."""
        assert self.teacher is not None
        return self.teacher(images)

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> ModelOutput:
        """The teacher's full feature output (stages, pre-activations, embedding), without building a graph."""
        assert self.teacher is not None
        return self.teacher.forward_features(images)


class Vanilla(Distiller):
    """Cross-entropy on labels alone: the teacher's own training and the student-alone baseline."""

    name = "vanilla"

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, labels)}
