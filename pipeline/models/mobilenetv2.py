"""The CIFAR MobileNetV2 of the CRD distillation benchmark (``mobilenetv2``, CRD's ``mobile_half``).

Layer for layer CRD/RepDistiller's ``mobile_half`` (``models/mobilenetv2.py``, from
the RCO paper's code): MobileNetV2 at width 0.5 and expansion 6 with a stride-2
3x3 stem, seven groups of inverted residual blocks (t, c, n, s) =
(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
(6, 160, 3, 2), (6, 320, 1, 1) with c halved, a 1x1 conv to 1280 channels, global
pooling and one linear classifier. Unlike torchvision, every inverted residual has
its 1x1 expansion convolution, even at t = 1 (this matters for the parameter count).

Mapping onto :class:`~pipeline.models.base.StagedNet`, following CRD's features:

- stem: conv3x3/2 -> BN -> ReLU (CRD's ``f0``)
- stages: groups 0-1, 2, 3-4, 5-6 (CRD's ``f1`` ... ``f4``), 12, 16, 48, 160
  channels at reductions 2, 4, 8, 16
- pre == post: inverted residuals end in a linear (BN-only) projection, so no
  stage ends with an activation
- neck: the 1x1 conv -> BN -> ReLU to 1280 channels; the embedding is its pooled
  output.

Initialisation as the reference: convolutions normal(0, sqrt(2 / (k*k*out))), BN
weight 1 / bias 0, classifier normal(0, 0.01) with zero bias.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Stage, StagedNet, StageInfo, init_fan_out_weights
from .registry import register_model

FAMILY = "mobilenetv2"

# t (expansion), c (channels at width 1), n (blocks), s (stride of the first block)
SETTINGS: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]
# Which setting groups form each stage (CRD's f1..f4).
STAGE_GROUPS: list[list[int]] = [[0, 1], [2], [3, 4], [5, 6]]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> BN-ReLU -> 3x3 depthwise -> BN-ReLU -> 1x1 project -> BN (+ identity)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out



def cifar_mobilenetv2(expansion: int, width_mult: float, num_classes: int, in_channels: int) -> StagedNet:
    """CRD's CIFAR MobileNetV2 with expansion ``expansion`` and width ``width_mult``."""
    channels = int(32 * width_mult)
    stem = _conv_bn_relu(in_channels, channels, 3, 2)
    groups: list[list[nn.Module]] = []
    strides: list[int] = []
    for t, c, n, s in SETTINGS:
        out = int(c * width_mult)
        blocks: list[nn.Module] = []
        for i in range(n):
            blocks.append(InvertedResidual(channels, out, s if i == 0 else 1, expansion if t is None else t))
            channels = out
        groups.append(blocks)
        strides.append(s)
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    reduction = 2  # the stem's stride
    for group_ids in STAGE_GROUPS:
        blocks = [b for g in group_ids for b in groups[g]]
        for g in group_ids:
            reduction *= strides[g]
        stages.append(Stage(nn.Sequential(*blocks)))
        info.append(StageInfo(channels=int(SETTINGS[group_ids[-1]][1] * width_mult), reduction=reduction))
    last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
    neck = _conv_bn_relu(channels, last_channel, 1, 1)
    model = StagedNet(stem, stages, neck, last_channel, num_classes, info)
    init_fan_out_weights(model)
    return model


@register_model("mobilenetv2", FAMILY, "CIFAR MobileNetV2 width 0.5, expansion 6 (CRD's mobile_half)")
def mobilenetv2(num_classes: int, in_channels: int, image_size: int) -> StagedNet:
    """CRD's ``mobile_half``: CIFAR MobileNetV2 at width 0.5, expansion 6."""
    del image_size  # padded strided convolutions never shrink below 1x1
    return cifar_mobilenetv2(6, 0.5, num_classes, in_channels)
