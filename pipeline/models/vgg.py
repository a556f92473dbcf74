"""CIFAR VGGs with batch norm of the CRD distillation benchmark (vgg8, vgg11, vgg13, vgg16, vgg19).

Layer for layer the ``vgg*_bn`` networks the CRD/RepDistiller benchmark trains
under the names ``vgg8`` ... ``vgg19`` (``models/vgg.py``): five blocks of
conv3x3 (with bias) -> BN -> ReLU layers, each block's last ReLU applied outside
the block, 2x2 max pools between blocks, global pooling and a single linear
classifier (the fully connected layers of ImageNet VGG are removed).

As in the reference, the max pool between blocks 3 and 4 is only used for larger
inputs: CRD applies it only at 64x64 (Tiny-ImageNet); we apply it from 64x64 up,
so at 32x32 blocks 3 and 4 both run at 4x4, exactly as in the benchmark. A pool
that would shrink a map below 1x1 (inputs smaller than 8x8) becomes the identity.
Neither choice changes the parameters.

Mapping onto :class:`~pipeline.models.base.StagedNet`:

- stem: none (identity)
- stages: ``block0`` ... ``block4``, each preceded by the max pool that follows the
  previous block (stage 0 has none), so stage outputs are CRD's ``f0`` ... ``f4``;
  reductions at 32x32: 1, 2, 4, 8, 8
- pre: the block's last BN output; post: ``relu(pre)`` (CRD's ``preact`` features)
- neck: none; the embedding is the pooled ``block4`` output (512 channels).

Initialisation as the reference: convolutions normal(0, sqrt(2 / (k*k*out))) with
zero bias, BN weight 1 / bias 0, classifier normal(0, 0.01) with zero bias.
"""

from __future__ import annotations

from torch import nn

from .base import Stage, StagedNet, StageInfo, init_fan_out_weights
from .registry import register_model

FAMILY = "vgg"

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}

# Input side from which the pool between blocks 3 and 4 is used (CRD: only at 64).
POOL3_MIN_SIZE = 64


def _block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU layers, without the last ReLU (the stage applies it)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])



def vgg(cfg: list[list[int]], num_classes: int, in_channels: int, image_size: int) -> StagedNet:
    """A CIFAR VGG with batch norm from per-block conv widths ``cfg`` (five blocks)."""
    if len(cfg) != 5:
        raise ValueError(f"a CIFAR VGG has 5 blocks, got a config with {len(cfg)}")
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    size, reduction, channels = image_size, 1, in_channels
    for i, widths in enumerate(cfg):
        use_pool = i in (1, 2, 3) or (i == 4 and image_size >= POOL3_MIN_SIZE)
        pool: nn.Module = nn.Identity()
        if use_pool and size >= 2:  # a 2x2/2 max pool on a 1x1 map would leave nothing
            pool = nn.MaxPool2d(kernel_size=2, stride=2)
            size //= 2
            reduction *= 2
        stages.append(Stage(nn.Sequential(pool, _block(widths, channels)), nn.ReLU()))
        channels = widths[-1]
        info.append(StageInfo(channels=channels, reduction=reduction))
    model = StagedNet(nn.Identity(), stages, None, channels, num_classes, info)
    init_fan_out_weights(model)
    return model


def _register(name: str, description: str) -> None:
    cfg = CONFIGS[name]

    def factory(num_classes: int, in_channels: int, image_size: int) -> StagedNet:
        return vgg(cfg, num_classes, in_channels, image_size)

    factory.__name__ = name
    factory.__doc__ = description
    register_model(name, FAMILY, description)(factory)


_register("vgg8", "CIFAR VGG-8 with BN (1 conv per block), CRD benchmark student")
_register("vgg11", "CIFAR VGG-11 with BN, CRD benchmark")
_register("vgg13", "CIFAR VGG-13 with BN, CRD benchmark teacher")
_register("vgg16", "CIFAR VGG-16 with BN, CRD benchmark")
_register("vgg19", "CIFAR VGG-19 with BN, CRD benchmark")
