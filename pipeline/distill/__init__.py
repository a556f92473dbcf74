"""Distillation methods: pure loss functions and one ``Distiller`` module per method."""

from pipeline.distill.base import Distiller, MethodSetupError, Vanilla
from pipeline.distill.registry import METHOD_REGISTRY, build_method, register_method

__all__ = ["Distiller", "MethodSetupError", "Vanilla", "METHOD_REGISTRY", "build_method", "register_method"]
