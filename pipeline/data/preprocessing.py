"""What a deployment runner must do to a raw image, as data: :func:`preprocessing_spec`.

The spec is JSON-able and goes into the edge bundle. :func:`preprocess_image` is the
reference implementation of it and uses only numpy and Pillow (no torch, nothing
from this package), so a runner can copy it as is; the tests check that it
reproduces the evaluation tensors of the datasets exactly.

Steps, in order:
1. convert the image to ``mode`` (``"L"`` grey, ``"RGB"`` colour) when it is a Pillow image;
2. take its pixels as float32 and divide by ``scale`` (255 for the 8-bit images every dataset trains on);
3. if its side differs from ``size``: resize each channel as a Pillow ``"F"`` (float32) image
   to ``size x size`` with the BILINEAR filter (aspect ratio not kept);
4. per channel ``(x - mean) / std``;
5. lay out as ``NCHW`` float32 (batch of one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pipeline.data.base import DataSplits

SPEC_FORMAT = "kdpipe-preprocessing/1"


def preprocessing_spec(splits: DataSplits) -> dict[str, Any]:
    """Describe, as plain JSON-able values, how a raw image becomes the model input for ``splits``' models."""
    return {
        "format": SPEC_FORMAT,
        "dataset": splits.name,
        "size": int(splits.image_size),
        "height": int(splits.image_size),
        "width": int(splits.image_size),
        "channels": int(splits.in_channels),
        "mode": splits.mode,
        "scale": float(splits.scale),
        "native_size": splits.native_size,
        "resize": {
            "method": "bilinear",
            "library": "Pillow",
            "filter": "Image.Resampling.BILINEAR",
            "space": "float32 per channel (Pillow mode 'F'), after dividing by scale",
            "keep_aspect_ratio": False,
            "only_if_size_differs": True,
        },
        "mean": [float(m) for m in splits.mean],
        "std": [float(s) for s in splits.std],
        "layout": "NCHW",
        "dtype": "float32",
        "num_classes": int(splits.num_classes),
        "steps": [
            f"convert to Pillow mode {splits.mode!r}",
            f"float32 pixels / {float(splits.scale):g}",
            f"if the size differs: resize each channel to {splits.image_size}x{splits.image_size} "
            "as a Pillow 'F' image with BILINEAR",
            "subtract mean and divide by std per channel",
            "transpose to NCHW and add the batch dimension",
        ],
    }


def preprocess_image(spec: dict[str, Any], image: Image.Image | np.ndarray) -> np.ndarray:
    """Apply ``spec`` to one raw image (Pillow image, or array [H, W] / [H, W, C] of raw values): float32 [1, C, S, S].

    Reference implementation for deployment runners; uses only numpy and Pillow.
    """
    channels, size = int(spec["channels"]), int(spec["size"])
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert(spec["mode"]), dtype=np.float32)
    else:
        pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] != channels:
        raise ValueError(
            f"image has {pixels.shape[2]} channel(s), the model expects {channels} (mode {spec['mode']!r})"
        )
    chw = pixels.transpose(2, 0, 1) / np.float32(spec["scale"])
    if chw.shape[1:] != (size, size):
        chw = np.stack(
            [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize(
                        (size, size), Image.Resampling.BILINEAR
                    ),
                    dtype=np.float32,
                )
                for c in chw
            ]
        )
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return ((chw - mean) / std).astype(np.float32)[None]
