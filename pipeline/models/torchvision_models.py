"""torchvision classification models wrapped into the staged feature API.

Registered under their torchvision names: resnet18, resnet34, resnet50,
mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, shufflenet_v2_x1_0,
efficientnet_b0. Each is built by torchvision with ``weights=None`` (nothing is
ever downloaded), optionally loaded from a local torchvision ``state_dict`` file,
adapted to the data (classifier, first convolution), and then re-assembled as a
:class:`~pipeline.models.base.StagedNet` that *shares* torchvision's modules: the
computation is torchvision's, only the grouping is ours.

Mapping (reductions are total strides, e.g. at 32x32 input the last stage is 1x1):

- resnet18/34/50: stem = conv1, bn1, relu, maxpool; stages = layer1 ... layer4
  (reductions 4, 8, 16, 32); pre = the last block's ``bn(conv) + shortcut`` before
  its final ReLU (computed by running that block step by step), post = relu(pre);
  no neck.
- mobilenet_v2: stem = features[0]; stages = features grouped by output stride:
  [1], [2-3], [4-6], [7-13], [14-17] (16, 24, 32, 96, 320 channels; reductions
  2 ... 32); neck = features[18] (1x1 conv to 1280); dropout before the classifier.
- mobilenet_v3_large: stem = features[0]; stages [1], [2-3], [4-6], [7-12],
  [13-15] (16, 24, 40, 112, 160; reductions 2 ... 32); neck = features[16] (960).
- mobilenet_v3_small: stem = features[0]; stages [1], [2-3], [4-8], [9-11]
  (16, 24, 48, 96; reductions 4, 8, 16, 32); neck = features[12] (576).
  For both MobileNetV3s the classifier's hidden Linear + Hardswish runs after the
  pooling as ``pre_logits``, so the embedding is 1280 (large) or 1024 (small) wide;
  its dropout sits between embedding and classifier.
- efficientnet_b0: stem = features[0]; stages [1], [2], [3], [4-5], [6-7]
  (16, 24, 40, 112, 320; reductions 2 ... 32); neck = features[8] (1280); dropout
  before the classifier.
- shufflenet_v2_x1_0: stem = conv1 + maxpool; stages = stage2, stage3, stage4
  (116, 232, 464; reductions 8, 16, 32); pre = the last block's output with its
  branch taken before the branch's final ReLU (shuffled like the output, so
  post = relu(pre)); neck = conv5 (1024).
- MobileNets and EfficientNet end every block in a linear projection, so their
  stages have ``pre == post``.

Adapting to the data: if ``num_classes`` differs from torchvision's 1000, the final
Linear is replaced and initialised as torchvision initialises it; if
``in_channels`` differs from 3, the first convolution is replaced. With pretrained
weights the new first convolution is derived from the RGB filters (summed for one
channel, so a grey image replicated to RGB gives the same response; tiled and
scaled by 3 / in_channels otherwise); without, it is freshly initialised as
torchvision does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlockStage, Stage, StagedNet, StageInfo
from .registry import register_model
from .shufflenet import channel_shuffle
from .weights import fit_state, read_state_file

if TYPE_CHECKING:  # torchvision is imported on first use: it costs seconds at every stage start
    from torchvision import models as tvm


def _tvm():
    """torchvision.models, imported lazily."""
    from torchvision import models

    return models


FAMILY = "torchvision"
IMAGENET_CLASSES = 1000


# ---------------------------------------------------------------- adaptation


def _parent_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, attr = _parent_and_attr(model, path)
    setattr(parent, attr, module)


def rgb_filters_to(weight: Tensor, in_channels: int) -> Tensor:
    """Map RGB first-layer filters ``[out, 3, k, k]`` to ``in_channels`` inputs.

    One channel: the sum over RGB, so a grey image gives the response the RGB
    network gives to that image replicated on its three channels. Otherwise the RGB
    filters are tiled over the new channels and scaled by ``3 / in_channels`` so the
    response to a constant image keeps its scale.
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _adapt_first_conv(model: nn.Module, path: str, in_channels: int, pretrained: bool, kaiming: bool) -> None:
    old = model.get_submodule(path)
    assert isinstance(old, nn.Conv2d) and old.groups == 1
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        bias=old.bias is not None,
    )
    with torch.no_grad():
        if pretrained:
            new.weight.copy_(rgb_filters_to(old.weight, in_channels))
            if old.bias is not None and new.bias is not None:
                new.bias.copy_(old.bias)
        elif kaiming:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
    _replace(model, path, new)


def _init_linear_default(m: nn.Linear) -> None:
    del m  # nn.Linear's own initialisation, as torchvision's ResNet/ShuffleNet keep it


def _init_linear_mobilenet(m: nn.Linear) -> None:
    nn.init.normal_(m.weight, 0.0, 0.01)
    nn.init.zeros_(m.bias)


def _init_linear_efficientnet(m: nn.Linear) -> None:
    bound = 1.0 / math.sqrt(m.out_features)
    nn.init.uniform_(m.weight, -bound, bound)
    nn.init.zeros_(m.bias)


def _adapt_classifier(model: nn.Module, path: str, num_classes: int, init: Callable[[nn.Linear], None]) -> nn.Linear:
    old = model.get_submodule(path)
    assert isinstance(old, nn.Linear)
    if old.out_features == num_classes:
        return old
    new = nn.Linear(old.in_features, num_classes)
    init(new)
    _replace(model, path, new)
    return new


# ---------------------------------------------------------------- pre-activations


def resnet_block_preact(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a torchvision ResNet block, returning ``(post, pre)`` around its final ReLU."""
    if isinstance(block, _tvm().resnet.Bottleneck):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    elif isinstance(block, _tvm().resnet.BasicBlock):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
    else:
        raise TypeError(f"not a torchvision ResNet block: {type(block).__name__}")
    shortcut = x if block.downsample is None else block.downsample(x)
    pre = out + shortcut
    return F.relu(pre), pre


def shufflenet_block_preact(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a torchvision ShuffleNetV2 block, returning ``(post, pre)`` around branch2's final ReLU."""
    if block.stride == 1:
        left, branch_in = x.chunk(2, dim=1)
    else:
        left, branch_in = block.branch1(x), x
    branch = list(block.branch2)
    for layer in branch[:-1]:
        branch_in = layer(branch_in)
    post = channel_shuffle(torch.cat([left, F.relu(branch_in)], 1), 2)
    pre = channel_shuffle(torch.cat([left, branch_in], 1), 2)
    return post, pre


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class _FeaturesSpec:
    """Layout of a torchvision model whose body is one ``features`` Sequential."""

    stage_ids: list[list[int]]
    neck_id: int
    channels: list[int]
    reductions: list[int]
    classifier_path: str
    dropout_id: int
    pre_logits_ids: list[int] = field(default_factory=list)


_FEATURE_SPECS: dict[str, _FeaturesSpec] = {
    "mobilenet_v2": _FeaturesSpec(
        stage_ids=[[1], [2, 3], [4, 5, 6], list(range(7, 14)), [14, 15, 16, 17]],
        neck_id=18,
        channels=[16, 24, 32, 96, 320],
        reductions=[2, 4, 8, 16, 32],
        classifier_path="classifier.1",
        dropout_id=0,
    ),
    "mobilenet_v3_large": _FeaturesSpec(
        stage_ids=[[1], [2, 3], [4, 5, 6], list(range(7, 13)), [13, 14, 15]],
        neck_id=16,
        channels=[16, 24, 40, 112, 160],
        reductions=[2, 4, 8, 16, 32],
        classifier_path="classifier.3",
        dropout_id=2,
        pre_logits_ids=[0, 1],
    ),
    "mobilenet_v3_small": _FeaturesSpec(
        stage_ids=[[1], [2, 3], [4, 5, 6, 7, 8], [9, 10, 11]],
        neck_id=12,
        channels=[16, 24, 48, 96],
        reductions=[4, 8, 16, 32],
        classifier_path="classifier.3",
        dropout_id=2,
        pre_logits_ids=[0, 1],
    ),
    "efficientnet_b0": _FeaturesSpec(
        stage_ids=[[1], [2], [3], [4, 5], [6, 7]],
        neck_id=8,
        channels=[16, 24, 40, 112, 320],
        reductions=[2, 4, 8, 16, 32],
        classifier_path="classifier.1",
        dropout_id=0,
    ),
}

_LINEAR_INIT: dict[str, Callable[[nn.Linear], None]] = {
    "resnet18": _init_linear_default,
    "resnet34": _init_linear_default,
    "resnet50": _init_linear_default,
    "shufflenet_v2_x1_0": _init_linear_default,
    "mobilenet_v2": _init_linear_mobilenet,
    "mobilenet_v3_small": _init_linear_mobilenet,
    "mobilenet_v3_large": _init_linear_mobilenet,
    "efficientnet_b0": _init_linear_efficientnet,
}


def _first_conv_path(name: str) -> str:
    if name.startswith("resnet"):
        return "conv1"
    if name.startswith("shufflenet"):
        return "conv1.0"
    return "features.0.0"


def _classifier_path(name: str) -> str:
    if name.startswith(("resnet", "shufflenet")):
        return "fc"
    return _FEATURE_SPECS[name].classifier_path


# ---------------------------------------------------------------- wrapping


def _staged(
    stem: nn.Module,
    stages: list[nn.Module],
    neck: nn.Module | None,
    info: list[StageInfo],
    classifier: nn.Linear,
    *,
    pre_logits: nn.Module | None = None,
    drop_rate: float = 0.0,
) -> StagedNet:
    net = StagedNet(
        stem,
        stages,
        neck,
        classifier.in_features,
        classifier.out_features,
        info,
        pre_logits=pre_logits,
        drop_rate=drop_rate,
    )
    net.classifier = classifier  # torchvision's own (possibly loaded) head
    return net


def _wrap_resnet(tv: tvm.ResNet, classifier: nn.Linear) -> StagedNet:
    stem = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool)
    layers = [tv.layer1, tv.layer2, tv.layer3, tv.layer4]
    stages: list[nn.Module] = [BlockStage(layer, resnet_block_preact) for layer in layers]
    info = []
    for layer, reduction in zip(layers, (4, 8, 16, 32), strict=True):
        last = layer[-1]
        conv = last.conv3 if isinstance(last, _tvm().resnet.Bottleneck) else last.conv2
        info.append(StageInfo(channels=conv.out_channels, reduction=reduction))
    return _staged(stem, stages, None, info, classifier)


def _wrap_shufflenet(tv: tvm.ShuffleNetV2, classifier: nn.Linear) -> StagedNet:
    stem = nn.Sequential(tv.conv1, tv.maxpool)
    layers = [tv.stage2, tv.stage3, tv.stage4]
    for layer in layers:
        if not isinstance(layer[-1].branch2[-1], nn.ReLU):
            raise TypeError("unexpected torchvision ShuffleNetV2 layout: branch2 does not end with a ReLU")
    stages: list[nn.Module] = [BlockStage(layer, shufflenet_block_preact) for layer in layers]
    # A stride-1 block passes half its channels through and computes the other half.
    channels = [2 * layer[-1].branch2[-3].out_channels for layer in layers]
    info = [StageInfo(channels=c, reduction=r) for c, r in zip(channels, (8, 16, 32), strict=True)]
    return _staged(stem, stages, tv.conv5, info, classifier)


def _wrap_features(tv: nn.Module, spec: _FeaturesSpec, classifier: nn.Linear) -> StagedNet:
    features = tv.features
    stages: list[nn.Module] = [Stage(nn.Sequential(*[features[i] for i in ids])) for ids in spec.stage_ids]
    info = [StageInfo(channels=c, reduction=r) for c, r in zip(spec.channels, spec.reductions, strict=True)]
    head = tv.classifier
    pre_logits = nn.Sequential(*[head[i] for i in spec.pre_logits_ids]) if spec.pre_logits_ids else None
    dropout = head[spec.dropout_id]
    assert isinstance(dropout, nn.Dropout)
    return _staged(
        features[0], stages, features[spec.neck_id], info, classifier, pre_logits=pre_logits, drop_rate=dropout.p
    )


def torchvision_model(
    name: str, num_classes: int, in_channels: int = 3, weights: str | Path | None = None
) -> StagedNet:
    """Build torchvision's ``name`` (no download), adapt it to the data, load ``weights`` if given, wrap.

    The weights file is a state_dict of torchvision's ``name`` (``.pth`` or
    ``.safetensors``) with any class count: a classifier of another size stays newly
    initialised, an RGB first convolution is mapped onto ``in_channels``
    (:func:`rgb_filters_to`); every other tensor must fit exactly.
    """
    if name not in _LINEAR_INIT:
        raise ValueError(f"no torchvision wrapper for {name!r}; known: {', '.join(sorted(_LINEAR_INIT))}")
    tv: nn.Module = getattr(_tvm(), name)(weights=None)
    head = _classifier_path(name)
    _adapt_classifier(tv, head, num_classes, _LINEAR_INIT[name])
    first = _first_conv_path(name)
    if in_channels != 3:
        kaiming = not name.startswith("shufflenet")  # torchvision's ShuffleNetV2 keeps default init
        _adapt_first_conv(tv, first, in_channels, pretrained=False, kaiming=kaiming)
    loaded: frozenset[str] = frozenset()
    if weights is not None:
        state = read_state_file(weights, name)
        own = tv.state_dict()
        new_head = {k for k in (f"{head}.weight", f"{head}.bias")
                    if k not in state or tuple(state[k].shape) != tuple(own[k].shape)}
        adapt = {f"{first}.weight": lambda w: rgb_filters_to(w, in_channels)} if in_channels != 3 else {}
        loaded = fit_state(tv, state, weights, f"torchvision {name}", new=new_head.__contains__, adapt=adapt)
    net = wrap_torchvision(tv, name)
    if loaded:
        net.pretrained_keys = keys_of_shared_tensors(tv, net, loaded)
    return net


def keys_of_shared_tensors(source: nn.Module, target: nn.Module, keys: frozenset[str]) -> frozenset[str]:
    """The names in ``target``'s state dict of the tensors ``source`` holds under ``keys`` (modules shared)."""
    ids = {id(t) for k, t in source.state_dict(keep_vars=True).items() if k in keys}
    return frozenset(k for k, t in target.state_dict(keep_vars=True).items() if id(t) in ids)


def wrap_torchvision(tv: nn.Module, name: str) -> StagedNet:
    """Re-assemble the torchvision model ``tv`` (built as ``name``) as a StagedNet sharing its modules.

    The result computes exactly what ``tv`` computes; the torchvision object itself
    is not kept, only its modules.
    """
    classifier = tv.get_submodule(_classifier_path(name))
    assert isinstance(classifier, nn.Linear)
    if isinstance(tv, _tvm().ResNet):
        return _wrap_resnet(tv, classifier)
    if isinstance(tv, _tvm().ShuffleNetV2):
        return _wrap_shufflenet(tv, classifier)
    return _wrap_features(tv, _FEATURE_SPECS[name], classifier)


_DESCRIPTIONS = {
    "resnet18": "torchvision ResNet-18 (ImageNet layout: 7x7/2 stem + max pool)",
    "resnet34": "torchvision ResNet-34 (ImageNet layout: 7x7/2 stem + max pool)",
    "resnet50": "torchvision ResNet-50 with bottleneck blocks",
    "mobilenet_v2": "torchvision MobileNetV2 (width 1.0)",
    "mobilenet_v3_small": "torchvision MobileNetV3-Small",
    "mobilenet_v3_large": "torchvision MobileNetV3-Large",
    "shufflenet_v2_x1_0": "torchvision ShuffleNetV2 x1.0",
    "efficientnet_b0": "torchvision EfficientNet-B0",
}


def _register(name: str) -> None:
    def factory(num_classes: int, in_channels: int, image_size: int, weights: str | None = None) -> StagedNet:
        del image_size  # padded strided convs and pools keep at least 1x1; pooling is adaptive
        return torchvision_model(name, num_classes, in_channels, weights)

    factory.__name__ = name
    factory.__doc__ = _DESCRIPTIONS[name]
    register_model(name, FAMILY, _DESCRIPTIONS[name], accepts_weights=True)(factory)


for _name in _DESCRIPTIONS:
    _register(_name)
