"""Model registry: the CIFAR distillation zoo, torchvision models, tiny nets and any timm model.

Build any network by name with :func:`build`; every model is a
:class:`~pipeline.models.base.FeatureNet` exposing stage features (post- and
pre-activation), the pooled embedding and its :class:`FeatureInfo`. The registered
families are :class:`~pipeline.models.base.StagedNet` assemblies, which online
methods can also split into shared layers and branches.

Families (one module each, imported here so their factories register):
``cifar_resnet``, ``wrn``, ``vgg``, ``mobilenetv2``, ``shufflenet`` (the CRD
benchmark zoo), ``torchvision`` and ``tiny``; ``timm/<name>`` resolves against the
installed timm (:mod:`pipeline.models.timm_models`, imported when first asked for).
"""

from . import cifar_resnet, mobilenetv2, shufflenet, tiny, torchvision_models, vgg, wrn  # noqa: F401  (register)
from .base import FeatureInfo, FeatureNet, ModelOutput, StagedNet, StageInfo, count_parameters, feature_shapes
from .registry import UnknownModelError, available, build, families, model_info, register_model

__all__ = [
    "FeatureInfo",
    "FeatureNet",
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
