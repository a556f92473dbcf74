"""Core types of the dataset registry: :class:`DataSplits`, the registry and :func:`build_data`.

A dataset is a function ``builder(cfg, seed) -> DataSplits`` registered under its
``data.name`` with :func:`register_dataset`. The dataset modules of this package
register themselves when ``pipeline.data`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.config.training import DataConfig


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset's files are not where ``data.root`` says; the message names the path and the expected layout."""


class BadDatasetError(DatasetNotFoundError, ValueError):
    """The dataset's files are there but cannot be used as they are: an unreadable image or batch file, an
    empty class folder, class folders that differ between splits, too few samples to split. The message
    names the file or folder and what to do.

    A :class:`DatasetNotFoundError`, so that whatever turns dataset errors into a one-line message (the
    stages print them without a traceback) treats it alike; a :class:`ValueError` for callers that expect one.
    """


@dataclass
class DataSplits:
    """The four splits of one dataset plus what models, the engine and the deploy bundle need to know.

    Every item of every split is ``(image float32 [C, H, W] normalised, label int,
    index int)``, ``index`` being the position in that split. ``train`` is augmented
    (when ``data.augment``); ``train_eval`` holds the same samples and labels without
    augmentation (calibration, evaluation on train); ``val`` and ``test`` are never
    augmented. ``hflip`` and ``pad`` describe the augmentation ``train`` applies
    (``False``/``0`` when augmentation is off). ``noisy_indices`` are the train
    positions whose label was flipped by ``data.label_noise``.
    """

    name: str
    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    pad: int
    noisy_indices: list[int] = field(default_factory=list)
    #: Image files left out under ``bad_images: skip`` (image folders only).
    skipped_files: list[str] = field(default_factory=list)
    #: Pillow mode a raw image is converted to before use: ``"L"`` or ``"RGB"``.
    mode: str = "RGB"
    #: Raw pixel values are divided by this to reach [0, 1] (255, or 16 for digits).
    scale: float = 255.0
    #: Side of the raw images when they all share one (None for image folders).
    native_size: int | None = None


Builder = Callable[["DataConfig", int], DataSplits]

_REGISTRY: dict[str, Builder] = {}

#: Names of the registered datasets, in registration order (filled as the dataset modules import).
DATASET_NAMES: list[str] = []


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(cfg, seed) -> DataSplits`` under ``name`` (the value of ``data.name``)."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = builder
        DATASET_NAMES.append(name)
        return builder

    return decorate


def build_data(cfg: DataConfig, seed: int) -> DataSplits:
    """Build the splits of dataset ``cfg.name``; the same ``cfg`` and ``seed`` give the same splits, labels, stats."""
    try:
        builder = _REGISTRY[cfg.name]
    except KeyError:
        raise ValueError(
            f"data.name = {cfg.name!r} is not a registered dataset; choose one of {DATASET_NAMES}"
        ) from None
    return builder(cfg, int(seed))
