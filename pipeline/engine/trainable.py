"""What the training loop trains: the :class:`Trainable` protocol.

:func:`pipeline.engine.loop.fit` needs a task that is an ``nn.Module`` (it moves it,
switches train/eval mode, calls it, wraps it in ``DistributedDataParallel``) and that
answers a few questions about itself: which parameters to optimise, what a checkpoint
holds, what to score on validation and what to deploy. The engine states that here, so
it need not import the methods' base class: :class:`pipeline.distill.base.Distiller`
satisfies the protocol structurally, without inheriting from anything in the engine
(imports go distill -> engine, never back).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Trainable(Protocol):
    """A training task for :func:`~pipeline.engine.loop.fit`: an ``nn.Module`` with these methods.

    Calling it with ``(images, labels, indices)`` returns the logits to score and a dict
    of named, already-weighted loss terms (the loop sums them). Parameters and buffers
    under :meth:`frozen_prefixes` (a frozen teacher) are neither trained, checkpointed
    nor synchronised between ranks.
    """

    # -- the nn.Module surface the loop uses --------------------------------
    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]: ...

    # -- the task's own contract ---------------------------------------------
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters the optimizer updates."""
        ...

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything that changes during training: what a resume checkpoint holds."""
        ...

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`."""
        ...

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Called in train mode before every epoch (schedules inside a method)."""
        ...

    def rank_summed_buffers(self) -> tuple[str, ...]:
        """Buffers whose per-epoch increases are summed over the ranks under DDP."""
        ...

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes that are not trained and not checkpointed."""
        ...

    def eval_logits(self, images: Tensor) -> dict[str, Tensor]:
        """Logits scored on validation (``model`` is the deployable network's)."""
        ...

    def deployable(self) -> nn.Module:
        """The plain network that route checkpoints save."""
        ...
