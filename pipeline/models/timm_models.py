"""Any timm model by name (``timm/<name>``), with its features read through timm's own API.

timm holds the families engineers deploy on edge devices (MobileNetV3/V4,
EfficientNet(-Lite), GhostNet, RepViT, FastViT, MobileOne, ResNet-D, ConvNeXt ...)
behind one interface, so they are not registered one by one: ``timm/<name>`` is
resolved when asked for, and timm is imported only then (it costs seconds).

Features come from timm's feature API, not from hooks on module names:

- stage maps: ``forward_intermediates`` at every index of ``feature_info`` (its
  channels and reductions are the stage layout);
- the embedding: ``forward_head(..., pre_logits=True)``, the vector the classifier
  reads; logits are ``get_classifier()`` of it, which is the model's own forward;
- pre-activation maps equal the stage maps where a stage ends without an
  activation (the residual and inverted-residual blocks of most mobile families).
  Where a stage ends in one (ResNet, MobileOne, a ConvBnAct head stage) timm does
  not expose the map before it, so that index is listed in
  ``feature_info.preact_missing`` and the methods that need it (AB, ReviewKD) fail
  at load naming the model and the stage.

A timm model is not a stem + stages assembly, so ONE and OKDDip (which split a
network into shared low layers and branches) refuse it at load; DML and EKD train
whole networks and take any timm model.

Re-parameterisable families (MobileOne, RepViT, FastViT, RepGhost ...) train with
their branches and are fused for export by ``timm.utils.reparameterize_model``
(:meth:`TimmNet.export_form`), computed in float64 and rounded once.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import FeatureInfo, FeatureNet, ModelOutput, StageInfo
from .errors import UnknownModelError
from .names import matches
from .weights import fit_state, read_state_file

PREFIX = "timm/"
FAMILY = "timm"

# Blocks (qualified class names) whose output is a linear map of the block's last layer plus its shortcut:
# the stage map is its own pre-activation.
_LINEAR_END = {
    "timm.models._efficientnet_blocks.InvertedResidual",
    "timm.models._efficientnet_blocks.CondConvResidual",
    "timm.models._efficientnet_blocks.EdgeResidual",
    "timm.models._efficientnet_blocks.UniversalInvertedResidual",
    "timm.models._efficientnet_blocks.MobileAttention",
    "timm.models.ghostnet.GhostBottleneck",
    "timm.models.ghostnet.GhostBottleneckV3",
    "timm.models.repvit.RepViTBlock",
    "timm.models.fastvit.RepMixerBlock",
    "timm.models.fastvit.AttentionBlock",
    "timm.models.convnext.ConvNeXtBlock",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
}


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def ends_linear(module: nn.Module) -> bool:
    """Whether ``module``'s output has no activation after its last layer (so it is its own pre-activation).

    Unknown blocks count as ending in an activation: a pre-activation is never
    claimed where it is not known to be the output.
    """
    name = _qualname(module)
    if name in _LINEAR_END:
        return True
    if name == "timm.models._efficientnet_blocks.DepthwiseSeparableConv":
        return not module.has_pw_act
    if name in ("timm.models._efficientnet_blocks.ConvBnAct", "timm.layers.norm_act.BatchNormAct2d"):
        norm = module.bn1 if hasattr(module, "bn1") else module
        return isinstance(getattr(norm, "act", None), nn.Identity)
    if isinstance(module, nn.Sequential) and len(module):
        return ends_linear(module[-1])
    blocks = getattr(module, "blocks", None)  # RepVitStage, FastVitStage, ConvNeXtStage: ... -> blocks
    if isinstance(blocks, nn.Sequential) and len(blocks) and name.rsplit(".", 1)[-1].endswith("Stage"):
        return ends_linear(blocks[-1])
    return False


def _timm() -> Any:
    import timm

    return timm


def is_timm_name(name: str) -> bool:
    """Whether ``name`` asks for a timm model (``timm/<name>``)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def check_timm_name(name: str) -> str:
    """``name`` if the installed timm has that model; else an UnknownModelError with close names and how to list them."""
    bare = name[len(PREFIX):]
    timm = _timm()
    if bare and timm.is_model(bare):
        return name
    close = difflib.get_close_matches(bare, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(repr(PREFIX + c) for c in close)}?)" if close else ""
    raise UnknownModelError(name, [], f"unknown timm model {name!r}{hint}; `kdpipe models --source timm PATTERN` "
                                     f"lists what timm {timm.__version__} has")


def list_timm(pattern: str | None = None) -> list[str]:
    """Names (with the ``timm/`` prefix) of the installed timm's models matching ``pattern`` (:func:`matches`)."""
    return [PREFIX + n for n in _timm().list_models() if matches(n, pattern)]


class TimmNet(FeatureNet):
    """A timm model behind the registry's feature API; it computes exactly what the timm model computes.

    The timm model is the ``model`` attribute: state-dict keys are timm's with a
    ``model.`` prefix.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
            raise ValueError(f"timm model {name!r} has no forward_intermediates/feature_info (timm's feature API); "
                             "the registry cannot read its stage features")
        self.model = model
        self.timm_name = name
        self.num_classes = int(model.num_classes)
        info = model.feature_info
        stages = [StageInfo(channels=int(f["num_chs"]), reduction=int(f["reduction"])) for f in info]
        missing = tuple(i for i, f in enumerate(info) if not ends_linear(model.get_submodule(f["module"])))
        width = getattr(model, "head_hidden_size", None) or model.num_features
        self.feature_info = FeatureInfo(stages=stages, embedding_dim=int(width), preact_missing=missing)

    def forward_features(self, x: Tensor) -> ModelOutput:
        """Stage maps from ``forward_intermediates``, the embedding from ``forward_head(pre_logits=True)``."""
        final, maps = self.model.forward_intermediates(x, intermediates_only=False)
        emb = self.model.forward_head(final, pre_logits=True)
        logits = self.model.get_classifier()(emb)
        missing = set(self.feature_info.preact_missing)
        preact = [None if i in missing else t for i, t in enumerate(maps)]
        return ModelOutput(logits=logits, stages=list(maps), preact=preact, embedding=emb)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def export_form(self) -> nn.Module:
        """A copy with re-parameterisable branches fused (``timm.utils.reparameterize_model``), in float32."""
        from timm.utils import reparameterize_model

        fused = reparameterize_model(copy.deepcopy(self.model).double().eval())
        return fused.float().eval()


def _head_keys(model: nn.Module) -> list[str]:
    """State-dict keys (timm's names) of the classifier(s), from the model's pretrained config."""
    heads = model.pretrained_cfg.get("classifier") or []
    heads = [heads] if isinstance(heads, str) else list(heads)
    own = model.state_dict()
    return [k for k in own if any(k.startswith(h + ".") for h in heads)]


def _first_conv_key(model: nn.Module) -> str | None:
    first = model.pretrained_cfg.get("first_conv")
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    key = f"{first}.weight" if first else None
    return key if key in model.state_dict() else None


def build_timm(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, weights: str | Path | None = None
) -> TimmNet:
    """Build timm's ``name`` (``timm/<name>``) for this data, nothing downloaded; load ``weights`` if given.

    The weights file is a timm state dict (``.safetensors`` or ``.pth``) of the same
    architecture with any class count and input channels: a classifier of another
    size stays newly initialised, a first convolution of other input channels is
    adapted as timm adapts it (summed to grey, tiled otherwise); every other tensor
    must fit exactly, or a one-line :class:`WeightsError` names the keys.
    """
    del image_size  # convolutional timm models pool adaptively; a too-small input fails in its first forward
    full = name if is_timm_name(name) else PREFIX + name
    check_timm_name(full)
    bare = full[len(PREFIX):]
    timm = _timm()
    model = timm.create_model(bare, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    loaded: frozenset[str] = frozenset()
    if weights is not None:
        from timm.models import adapt_input_conv

        state = read_state_file(weights, full)
        own = model.state_dict()
        new_head = {k for k in _head_keys(model) if k not in state or tuple(state[k].shape) != tuple(own[k].shape)}
        first = _first_conv_key(model)
        adapt = {}
        if first is not None and first in state and state[first].shape[1] != in_channels:
            adapt[first] = lambda w: adapt_input_conv(in_channels, w)
        loaded = fit_state(model, state, weights, full, new=new_head.__contains__, adapt=adapt)
    net = TimmNet(model, bare)
    net.pretrained_keys = frozenset(f"model.{k}" for k in loaded)
    return net


def timm_description(name: str) -> str:
    """A line about ``timm/<name>``: its architecture and parameter count at 1000 classes (built, not downloaded)."""
    check_timm_name(name)
    bare = name[len(PREFIX):]
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = _timm().create_model(bare, pretrained=False)
    except Exception:  # a family that cannot be built on the meta device
        return f"timm model {bare}"
    params = sum(p.numel() for p in model.parameters())
    return f"timm {type(model).__name__} ({params / 1e6:.2f}M params at 1000 classes)"
