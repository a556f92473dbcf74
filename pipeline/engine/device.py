"""Where training runs: CUDA with AMP and channels_last when present, the CPU otherwise."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch


def pick_device() -> torch.device:
    """``KDPIPE_DEVICE`` if set, else the first CUDA device, else the CPU."""
    forced = os.environ.get("KDPIPE_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """fp16 autocast on CUDA when enabled; a no-op on the CPU (CPU runs stay exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()
