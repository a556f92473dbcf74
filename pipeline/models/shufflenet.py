"""CIFAR ShuffleNets of the CRD distillation benchmark (``shufflenetv1``, ``shufflenetv2``).

Layer for layer CRD/RepDistiller's ``ShuffleV1`` (``models/ShuffleNetv1.py``: groups 3,
stage widths 240/480/960, 4/8/4 blocks) and ``ShuffleV2`` (``models/ShuffleNetv2.py``:
net size 1, stage widths 116/232/464, a down-sampling block followed by 3/7/3 basic
blocks, a 1x1 conv to 1024 channels). Both start with a 1x1 convolution to 24
channels at full resolution (the CIFAR variant has no stride-2 stem or max pool).
The reference leaves PyTorch's default initialisation in place, and so do we.

Mapping onto :class:`~pipeline.models.base.StagedNet`:

ShuffleNetV1

- stem: conv1x1 -> BN -> ReLU (24 channels; CRD's ``f0``)
- stages: ``layer1`` ... ``layer3`` (240, 480, 960 channels; reductions 2, 4, 8)
- pre: the last block's sum (or, for stride 2, concatenation) of the residual and
  shortcut paths before the final ReLU (CRD's ``preact``); post: ``relu(pre)``
- neck: none; the embedding is the pooled ``layer3`` output (960).

ShuffleNetV2

- stem: conv1x1 -> BN -> ReLU (24 channels)
- stages: ``layer1`` ... ``layer3`` (116, 232, 464 channels; reductions 2, 4, 8)
- pre: the last block's output with its branch taken before that branch's final
  ReLU; post: the block output. CRD returns that pre-activation concatenation
  *before* the channel shuffle; we shuffle it like the output, so ``pre`` and
  ``post`` share a channel order and ``post == relu(pre)`` (all channels
  are non-negative on the pass-through half). Same numbers, permuted channels.
- neck: conv1x1 -> BN -> ReLU to 1024 channels; the embedding is its pooled output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlockStage, StagedNet, StageInfo
from .registry import register_model

FAMILY = "shufflenet"


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` equal groups: [g, C/g] -> [C/g, g]."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _stem(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------- v1


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1 bottleneck.

    At stride 2 the shortcut is a 3x3 average pool and the two paths are
    concatenated (``out_planes`` then counts only the residual path's channels);
    at stride 1 they are added.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        mid = out_planes // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(relu(pre), pre)`` where ``pre`` joins the residual and shortcut paths."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(pre), pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


def shufflenet_v1(
    out_planes: tuple[int, int, int], num_blocks: tuple[int, int, int], groups: int, num_classes: int, in_channels: int
) -> StagedNet:
    """CRD's CIFAR ShuffleNetV1 with the given stage widths, depths and group count."""
    stem_width = 24
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    in_planes, reduction = stem_width, 1
    for width, n in zip(out_planes, num_blocks, strict=True):
        blocks: list[nn.Module] = []
        for i in range(n):
            stride = 2 if i == 0 else 1
            cat_planes = in_planes if i == 0 else 0  # stride 2 concatenates the shortcut
            # The very first 1x1 conv sees only the 24 stem channels: not grouped.
            first_groups = 1 if in_planes == stem_width else groups
            blocks.append(ShuffleV1Block(in_planes, width - cat_planes, stride, groups, first_groups))
            in_planes = width
        reduction *= 2
        stages.append(BlockStage(nn.Sequential(*blocks)))
        info.append(StageInfo(channels=width, reduction=reduction))
    return StagedNet(_stem(in_channels, stem_width), stages, None, out_planes[-1], num_classes, info)


@register_model("shufflenetv1", FAMILY, "CIFAR ShuffleNetV1 (groups 3), CRD's ShuffleV1")
def shufflenetv1(num_classes: int, in_channels: int, image_size: int) -> StagedNet:
    """CRD's ``ShuffleV1``: groups 3, stages 240/480/960 with 4/8/4 blocks."""
    del image_size  # padded stride-2 conv and average pool keep at least 1x1
    return shufflenet_v1((240, 480, 960), (4, 8, 4), 3, num_classes, in_channels)


# --------------------------------------------------------------------------- v2


class ShuffleV2Block(nn.Module):
    """Split the channels in half; pass one half through, transform the other; shuffle.

    Branch: 1x1 -> BN-ReLU -> depthwise 3x3 -> BN -> 1x1 -> BN-ReLU.
    """

    def __init__(self, channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(out, pre)``; ``pre`` has the branch before its last ReLU, same channel order."""
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        branch_pre = self.bn3(self.conv3(out))
        post = channel_shuffle(torch.cat([x1, F.relu(branch_pre)], 1), 2)
        pre = channel_shuffle(torch.cat([x1, branch_pre], 1), 2)
        return post, pre

    def forward(self, x: Tensor) -> Tensor:
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 block: two branches on the full input, concatenated and shuffled.

    Left: depthwise 3x3/2 -> BN -> 1x1 -> BN-ReLU. Right: 1x1 -> BN-ReLU ->
    depthwise 3x3/2 -> BN -> 1x1 -> BN-ReLU. Each gives half the output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


def shufflenet_v2(
    out_channels: tuple[int, int, int, int], num_blocks: tuple[int, int, int], num_classes: int, in_channels: int
) -> StagedNet:
    """CRD's CIFAR ShuffleNetV2 with stage widths ``out_channels[:3]`` and head width ``out_channels[3]``."""
    stem_width = 24
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    channels, reduction = stem_width, 1
    for width, n in zip(out_channels[:3], num_blocks, strict=True):
        blocks: list[nn.Module] = [ShuffleV2DownBlock(channels, width)]
        blocks += [ShuffleV2Block(width) for _ in range(n)]
        channels = width
        reduction *= 2
        stages.append(BlockStage(nn.Sequential(*blocks)))
        info.append(StageInfo(channels=width, reduction=reduction))
    neck = nn.Sequential(
        nn.Conv2d(channels, out_channels[3], kernel_size=1, bias=False),
        nn.BatchNorm2d(out_channels[3]),
        nn.ReLU(inplace=True),
    )
    return StagedNet(_stem(in_channels, stem_width), stages, neck, out_channels[3], num_classes, info)


@register_model("shufflenetv2", FAMILY, "CIFAR ShuffleNetV2 (net size 1), CRD's ShuffleV2")
def shufflenetv2(num_classes: int, in_channels: int, image_size: int) -> StagedNet:
    """CRD's ``ShuffleV2``: net size 1, stages 116/232/464 with 3/7/3 basic blocks, 1024-d head."""
    del image_size  # padded stride-2 depthwise convolutions keep at least 1x1
    return shufflenet_v2((116, 232, 464, 1024), (3, 7, 3), num_classes, in_channels)
