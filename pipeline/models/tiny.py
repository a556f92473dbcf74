"""Tiny plain CNNs sized for the embedded default data (8x8 grayscale digits, 10 classes).

``tinynet_s``, ``tinynet_m`` and ``tinynet_l`` train in seconds on a CPU, so the
whole pipeline (teacher, distilled students, export, benchmark) can run end to end
on the default dataset. Each is three stages of two conv3x3-BN-ReLU layers, the
first layer of stages 2 and 3 with stride 2; widths 8/16/32, 16/32/64 and
32/64/128.

Mapping onto :class:`~pipeline.models.base.StagedNet`:

- stem: none (identity); the first stage reads the image
- stages: three, reductions 1, 2, 4 (8x8 -> 8, 4, 2)
- pre: the stage's last BN output; post: ``relu(pre)``
- neck: none; the embedding is the pooled last stage (32, 64 or 128 channels).

Initialisation: Kaiming-normal (fan_out, ReLU) convolutions, BN weight 1 / bias 0.
"""

from __future__ import annotations

from torch import nn

from .base import Stage, StagedNet, StageInfo
from .registry import register_model

FAMILY = "tiny"

WIDTHS: dict[str, tuple[int, int, int]] = {
    "tinynet_xs": (4, 8, 16),
    "tinynet_s": (8, 16, 32),
    "tinynet_m": (16, 32, 64),
    "tinynet_l": (32, 64, 128),
}


def _stage(in_channels: int, width: int, stride: int) -> Stage:
    blocks = nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(width),
    )
    return Stage(blocks, nn.ReLU())


def tinynet(widths: tuple[int, int, int], num_classes: int, in_channels: int) -> StagedNet:
    """Three two-conv stages of the given widths, stride 2 entering stages 2 and 3."""
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    channels, reduction = in_channels, 1
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        reduction *= stride
        stages.append(_stage(channels, width, stride))
        info.append(StageInfo(channels=width, reduction=reduction))
        channels = width
    model = StagedNet(nn.Identity(), stages, None, channels, num_classes, info)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _register(name: str, description: str) -> None:
    widths = WIDTHS[name]

    def factory(num_classes: int, in_channels: int, image_size: int) -> StagedNet:
        del image_size  # padded strided convolutions never shrink below 1x1
        return tinynet(widths, num_classes, in_channels)

    factory.__name__ = name
    factory.__doc__ = description
    register_model(name, FAMILY, description)(factory)


_register("tinynet_xs", "tiny plain CNN, widths 4/8/16: a deliberately capacity-limited student for 8x8 digits")
_register("tinynet_s", "tiny plain CNN, widths 8/16/32: fast student for 8x8 digits")
_register("tinynet_m", "tiny plain CNN, widths 16/32/64: student or small teacher for 8x8 digits")
_register("tinynet_l", "tiny plain CNN, widths 32/64/128: teacher for 8x8 digits")
