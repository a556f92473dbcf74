"""Distillation losses as pure functions of tensors, each with its formula and paper.

Every function takes student quantities first and teacher quantities second; the
teacher side is treated as a constant (callers pass detached tensors, and the
functions detach again so a gradient can only reach the student).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_loss(logits_s: Tensor, logits_t: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` averaged over the batch. The
    ``T^2`` factor keeps the gradient magnitude independent of the temperature.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(logits_s / t, dim=1)
    log_p_t = F.log_softmax(logits_t.detach() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * (t * t)
