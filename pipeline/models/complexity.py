"""Model cost figures: parameters, multiply-accumulates and serialized size."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(model: nn.Module, in_channels: int, image_size: int) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch's flop counter / 2)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, in_channels, image_size, image_size, device=param.device, dtype=param.dtype)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() // 2)
