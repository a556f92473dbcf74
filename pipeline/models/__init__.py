"""Model registry: the CIFAR distillation zoo, torchvision models and tiny nets.

Build any network by name with :func:`build`; every model is a
:class:`~pipeline.models.base.StagedNet` exposing stage features (post- and
pre-activation), the pooled embedding and its :class:`FeatureInfo`.

Families (one module each, imported here so their factories register):
``cifar_resnet``, ``wrn``, ``vgg``, ``mobilenetv2``, ``shufflenet`` (the CRD
benchmark zoo), ``torchvision`` and ``tiny``.
"""

from . import cifar_resnet, mobilenetv2, shufflenet, tiny, torchvision_models, vgg, wrn  # noqa: F401  (register)
from .base import FeatureInfo, ModelOutput, StagedNet, StageInfo, count_parameters, feature_shapes
from .registry import UnknownModelError, available, build, families, model_info, register_model

__all__ = [
    "FeatureInfo",
    "ModelOutput",
    "StageInfo",
    "StagedNet",
    "UnknownModelError",
    "available",
    "build",
    "count_parameters",
    "families",
    "feature_shapes",
    "model_info",
    "register_model",
]
