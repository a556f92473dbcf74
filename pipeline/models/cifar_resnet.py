"""CIFAR ResNets of the CRD distillation benchmark (resnet8 ... resnet110, resnet8x4, resnet32x4).

Layer for layer the networks of the CRD/RepDistiller code base (``models/resnet.py``),
so parameter counts match the published tables: a 3x3 stem convolution, three
stages of basic blocks (depth = 6n + 2, n blocks per stage) at strides 1, 2, 2, a
1x1 convolution + BN shortcut where shape changes, global pooling and one linear
classifier. The ``x4`` variants are four times wider (32/64/128/256 channels).

Mapping onto :class:`~pipeline.models.base.StagedNet`:

- stem: conv3x3 -> BN -> ReLU (CRD's ``f0``)
- stages: ``layer1``, ``layer2``, ``layer3``; reductions 1, 2, 4
- post: the stage output (after the last block's ReLU; CRD's ``f1..f3``)
- pre: the last block's ``bn2(conv2) + shortcut`` before that ReLU (CRD's
  ``preact=True`` features)
- neck: none; the embedding is the pooled ``layer3`` output (64 or 256 channels).

Initialisation as the reference: Kaiming-normal (fan_out, ReLU) convolutions, BN
weight 1 / bias 0, PyTorch's default for the classifier.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlockStage, StagedNet, StageInfo
from .registry import register_model

FAMILY = "cifar_resnet"


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-conv shortcut, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(relu(sum), sum)``: the block output and its pre-activation."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        pre = out + shortcut
        return F.relu(pre), pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_resnet(depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int) -> StagedNet:
    """CIFAR ResNet of ``depth`` = 6n + 2 with stem width ``widths[0]`` and stage widths ``widths[1:]``."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
    n = (depth - 2) // 6
    stem = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    )
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    in_planes, reduction = widths[0], 1
    for planes, stride in zip(widths[1:], (1, 2, 2), strict=True):
        stages.append(BlockStage(_make_layer(in_planes, planes, n, stride)))
        reduction *= stride
        info.append(StageInfo(channels=planes, reduction=reduction))
        in_planes = planes
    model = StagedNet(stem, stages, None, widths[3], num_classes, info)
    _init_weights(model)
    return model


_BASE = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def _register(name: str, depth: int, widths: tuple[int, int, int, int], description: str) -> None:
    def factory(num_classes: int, in_channels: int, image_size: int) -> StagedNet:
        del image_size  # strided 3x3 convolutions with padding never shrink below 1x1
        return cifar_resnet(depth, widths, num_classes, in_channels)

    factory.__name__ = name
    factory.__doc__ = description
    register_model(name, FAMILY, description)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, _BASE, f"CIFAR ResNet-{_depth} (16/32/64 channels), CRD benchmark")
_register("resnet8x4", 8, _X4, "CIFAR ResNet-8 four times wider (64/128/256 channels), CRD benchmark student")
_register("resnet32x4", 32, _X4, "CIFAR ResNet-32 four times wider (64/128/256 channels), CRD benchmark teacher")
