"""Wide ResNets of the CRD distillation benchmark (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Layer for layer the pre-activation WRN-d-k of the CRD/RepDistiller code base
(``models/wrn.py``, no dropout): a 3x3 stem convolution, three groups of
(d - 4) / 6 BN-ReLU-conv blocks with 16k, 32k, 64k channels at strides 1, 2, 2
(a 1x1 convolution shortcut where the width changes), a final BN + ReLU, global
pooling and a linear classifier.

Mapping onto :class:`~pipeline.models.base.StagedNet`:

- stem: the 3x3 convolution (no activation: the blocks are pre-activation)
- stages: ``block1``, ``block2``, ``block3``; reductions 1, 2, 4. The network's
  final BN + ReLU belongs to the last stage, so its post output is
  ``relu(bn(block3 out))``, the last feature CRD's methods read, and its pre output
  ``bn(block3 out)``, CRD's ``preact=True`` ``f3``.
- stages 1 and 2 end in a residual sum with no activation of their own, so
  ``pre == post`` (the raw block output, CRD's ``f1``/``f2``). CRD's ``preact``
  variant instead applies the *next* group's first BN to them; a method that wants
  that can apply ``stages[i + 1].blocks[0].bn1`` itself.
- neck: none; the embedding is the pooled last-stage output (64k channels).

Initialisation as the reference: convolutions normal(0, sqrt(2 / (k*k*out)))
(Kaiming fan_out), BN weight 1 / bias 0, classifier bias 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Stage, StagedNet, StageInfo
from .registry import register_model

FAMILY = "wrn"


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    Where the width changes, the activated input feeds both the residual path and
    the 1x1 convolution shortcut, as in the reference.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        if self.shortcut is None:
            return x + out
        return self.shortcut(act) + out


def _group(in_planes: int, out_planes: int, n: int, stride: int) -> list[nn.Module]:
    return [WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def wide_resnet(depth: int, widen_factor: int, num_classes: int, in_channels: int) -> StagedNet:
    """WRN-``depth``-``widen_factor`` (depth = 6n + 4) as in the CRD benchmark."""
    if (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    stem = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    reduction = 1
    for i, stride in enumerate((1, 2, 2)):
        blocks = _group(widths[i], widths[i + 1], n, stride)
        reduction *= stride
        if i == 2:
            # The network's final BN + ReLU close the last stage: pre = bn(out).
            stages.append(Stage(nn.Sequential(*blocks, nn.BatchNorm2d(widths[3])), nn.ReLU()))
        else:
            stages.append(Stage(nn.Sequential(*blocks)))
        info.append(StageInfo(channels=widths[i + 1], reduction=reduction))
    model = StagedNet(stem, stages, None, widths[3], num_classes, info)
    _init_weights(model)
    return model


def _register(depth: int, k: int, description: str) -> None:
    name = f"wrn_{depth}_{k}"

    def factory(num_classes: int, in_channels: int, image_size: int) -> StagedNet:
        del image_size  # padded strided convolutions never shrink below 1x1
        return wide_resnet(depth, k, num_classes, in_channels)

    factory.__name__ = name
    factory.__doc__ = description
    register_model(name, FAMILY, description)(factory)


_register(16, 1, "WRN-16-1 (16/32/64 channels), CRD benchmark")
_register(16, 2, "WRN-16-2 (32/64/128 channels), CRD benchmark student")
_register(40, 1, "WRN-40-1 (16/32/64 channels), CRD benchmark student")
_register(40, 2, "WRN-40-2 (32/64/128 channels), CRD benchmark teacher")
