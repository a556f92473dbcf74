"""Methods by name: each registers its class, its params schema and whether it needs a teacher."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel
from torch import nn

from pipeline.distill.base import Distiller, MethodContext


@dataclass(frozen=True)
class MethodSpec:
    """What the pipeline needs to know about a method before building it."""

    name: str
    cls: type[Distiller]
    params: type[BaseModel]
    offline: bool


METHOD_REGISTRY: dict[str, MethodSpec] = {}
_MODULES = (
    "pipeline.distill.offline.kd",
    "pipeline.distill.offline.fitnets",
    "pipeline.distill.offline.at",
    "pipeline.distill.offline.ab",
    "pipeline.distill.offline.rkd",
    "pipeline.distill.offline.crd",
    "pipeline.distill.offline.dkd",
    "pipeline.distill.offline.reviewkd",
    "pipeline.distill.offline.sskd",
    "pipeline.distill.offline.rco",
    "pipeline.distill.offline.eskd",
    "pipeline.distill.online.dml",
    "pipeline.distill.online.one",
    "pipeline.distill.online.okddip",
    "pipeline.distill.online.ekd",
)


def register_method(name: str, params: type[BaseModel], offline: bool = True) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator adding a method to the registry under ``name``."""

    def deco(cls: type[Distiller]) -> type[Distiller]:
        if name in METHOD_REGISTRY and METHOD_REGISTRY[name].cls is not cls:
            raise ValueError(f"method {name!r} registered twice")
        METHOD_REGISTRY[name] = MethodSpec(name, cls, params, offline)
        return cls

    return deco


def load_methods() -> dict[str, MethodSpec]:
    """Import every method module so the registry is complete."""
    for mod in _MODULES:
        importlib.import_module(mod)
    return METHOD_REGISTRY


def build_method(
    name: str, student: nn.Module, teacher: nn.Module | None, params: BaseModel, ctx: MethodContext
) -> Distiller:
    """Build method ``name`` for a student (and a frozen teacher where the method is offline).

    Offline classes are called as ``cls(student, teacher, params, ctx)``, online ones as
    ``cls(student, params, ctx)`` (they build their other networks from ``ctx``).
    """
    specs = load_methods()
    if name not in specs:
        raise KeyError(f"unknown method {name!r}; allowed: {', '.join(sorted(specs))}")
    spec = specs[name]
    if spec.offline:
        if teacher is None:
            raise ValueError(f"method {name!r} distils from a teacher, but none was given")
        return spec.cls(student, teacher, params, ctx)
    return spec.cls(student, params, ctx)
