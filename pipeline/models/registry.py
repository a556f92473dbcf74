"""Registry of named model factories.

Every architecture the pipeline can train is a factory registered under a name, so
``params.yaml`` selects a network by a string and the rest of the code never imports
a model class. Factories are plain functions::

    @register_model("resnet8x4", family="cifar_resnet", description="...")
    def resnet8x4(num_classes: int, in_channels: int, image_size: int) -> StagedNet: ...

and :func:`build` is the only way to make a network from a name. Families whose
factories can load a local pretrained weight file (torchvision) register with
``accepts_weights=True``; their factory then also takes ``weights``.

Names of the form ``timm/<name>`` are not registered: they are resolved by
:mod:`pipeline.models.timm_models` against the installed timm when built, so every
timm model is available without importing timm where none is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import FeatureNet
from .errors import UnknownModelError
from .names import matches

__all__ = ["ModelEntry", "UnknownModelError", "available", "build", "families", "matches", "model_info",
           "register_model"]

Factory = Callable[..., FeatureNet]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its factory and what to tell a user about it."""

    name: str
    family: str
    description: str
    factory: Factory
    accepts_weights: bool


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, family: str, description: str = "", *, accepts_weights: bool = False
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(num_classes, in_channels, image_size)`` as ``name``.

    ``family`` groups related models (``available(family)``); ``accepts_weights``
    marks factories that also take ``weights`` (a local state_dict file). Names are
    unique: registering one twice is a programming error and raises ``ValueError``.
    """

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (family {_REGISTRY[name].family!r})")
        _REGISTRY[name] = ModelEntry(
            name=name,
            family=family,
            description=description or (factory.__doc__ or "").strip().split("\n")[0],
            factory=factory,
            accepts_weights=accepts_weights,
        )
        return factory

    return decorator


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModelError(str(name), available()) from None


def available(family: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally only those of one family.

    An unknown family raises ``ValueError`` listing the known families, so a typo
    is not mistaken for an empty family.
    """
    if family is None:
        return sorted(_REGISTRY)
    families = sorted({e.family for e in _REGISTRY.values()})
    if family not in families:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(families)}")
    return sorted(n for n, e in _REGISTRY.items() if e.family == family)


def families() -> list[str]:
    """Sorted names of the registered model families."""
    return sorted({e.family for e in _REGISTRY.values()})


def model_info(name: str) -> dict[str, Any]:
    """What the registry knows about ``name``: family, description, whether it takes weights."""
    from . import timm_models

    if timm_models.is_timm_name(name):
        return {"name": name, "family": timm_models.FAMILY, "description": timm_models.timm_description(name),
                "accepts_weights": True}
    e = _entry(name)
    return {"name": e.name, "family": e.family, "description": e.description, "accepts_weights": e.accepts_weights}


def _check_positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def build(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    weights: str | None = None,
) -> FeatureNet:
    """Build the registered model ``name`` (or ``timm/<name>``) for data with the given shape.

    ``in_channels`` sets the first convolution, ``num_classes`` the classifier and
    ``image_size`` (side of the square input) lets a model drop downsampling that
    would shrink a feature map below 1x1. ``weights`` is a local state_dict file,
    accepted by torchvision and timm models; nothing is downloaded.
    """
    from . import timm_models

    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("image_size", image_size)
    if timm_models.is_timm_name(name):
        return timm_models.build_timm(name, num_classes, in_channels, image_size, weights=weights)
    entry = _entry(name)
    if entry.accepts_weights:
        model = entry.factory(num_classes, in_channels, image_size, weights=weights)
    else:
        if weights is not None:
            raise ValueError(
                f"model {name!r} (family {entry.family!r}) cannot load the weights file {weights!r}: "
                f"only torchvision and timm/<name> models take pretrained weight files "
                f"({', '.join(n for n, e in sorted(_REGISTRY.items()) if e.accepts_weights)}, timm/...)"
            )
        model = entry.factory(num_classes, in_channels, image_size)
    if not isinstance(model, FeatureNet):
        raise TypeError(f"factory of {name!r} returned {type(model).__name__}, expected a FeatureNet")
    return model
