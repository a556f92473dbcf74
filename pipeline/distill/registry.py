"""Methods by name: each registers its class, its params schema and whether it needs a teacher."""

from __future__ import annotations

import importlib
import pkgutil
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
#: Packages whose modules are the methods, one module per method, named after it (plus shared helpers).
METHOD_PACKAGES = {"pipeline.distill.offline": True, "pipeline.distill.online": False}


def method_modules() -> dict[str, bool]:
    """Every module of the method packages (name -> offline), found on disk: adding a method is adding a file."""
    found = {}
    for package, offline in METHOD_PACKAGES.items():
        path = importlib.import_module(package).__path__
        found.update({f"{package}.{m.name}": offline for m in pkgutil.iter_modules(path) if not m.ispkg})
    return found


def register_method(name: str, params: type[BaseModel], offline: bool = True) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator adding a method to the registry under ``name``."""

    def deco(cls: type[Distiller]) -> type[Distiller]:
        if name in METHOD_REGISTRY and METHOD_REGISTRY[name].cls is not cls:
            raise ValueError(f"method {name!r} registered twice")
        package = next(p for p, kind in METHOD_PACKAGES.items() if kind == offline)
        if cls.__module__ != f"{package}.{name}":
            raise ValueError(f"method {name!r} must live in {package}.{name} (one file per method, named after it; "
                             f"dvc.yaml's stages depend on that file), not in {cls.__module__}")
        METHOD_REGISTRY[name] = MethodSpec(name, cls, params, offline)
        return cls

    return deco


def load_methods() -> dict[str, MethodSpec]:
    """Import every method module so the registry is complete (offline methods first, each kind by name)."""
    for module in method_modules():
        importlib.import_module(module)
    return dict(sorted(METHOD_REGISTRY.items(), key=lambda item: (not item[1].offline, item[0])))


def method_schemas(offline: bool) -> dict[str, type[BaseModel]]:
    """Method name -> its params schema, for the offline or the online methods."""
    return {name: spec.params for name, spec in load_methods().items() if spec.offline == offline}


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
