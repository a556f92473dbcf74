"""Distillation methods: pure loss functions and one ``Distiller`` module per method."""

from pipeline.distill.base import Distiller, MethodContext, MethodSetupError, Phase, Vanilla
from pipeline.distill.registry import METHOD_REGISTRY, build_method, register_method

__all__ = ["Distiller", "MethodContext", "Phase", "MethodSetupError", "Vanilla", "METHOD_REGISTRY", "build_method", "register_method"]
