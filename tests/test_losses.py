"""Loss functions against hand-computed values and the properties their papers state."""

from __future__ import annotations

import math

import torch

from pipeline.distill.losses import kd_loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    T = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [ps[1], ps[0]]
    kl = sum(q * math.log(q / p) for q, p in zip(pt, ps))
    assert math.isclose(kd_loss(s, t, T).item(), T * T * kl, rel_tol=1e-6)


def test_kd_loss_is_zero_when_student_equals_teacher_and_positive_otherwise():
    z = torch.randn(8, 10)
    assert kd_loss(z, z.clone(), 4.0).abs().item() < 1e-6
    assert kd_loss(z, torch.randn(8, 10), 4.0).item() > 0


def test_kd_loss_is_batch_mean():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    per = torch.stack([kd_loss(a[i : i + 1], b[i : i + 1], 3.0) for i in range(4)])
    assert torch.allclose(kd_loss(a, b, 3.0), per.mean(), atol=1e-6)


def test_kd_loss_temperature_scaling():
    # For large T, T^2 * KL -> mean squared difference of centred logits / (2 * C) (Hinton, sec. 2.1).
    torch.manual_seed(0)
    s, t = torch.randn(16, 10, dtype=torch.float64), torch.randn(16, 10, dtype=torch.float64)
    T = 1000.0
    sc, tc = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    approx = ((sc - tc) ** 2).sum(1).mean() / (2 * 10)
    assert math.isclose(kd_loss(s, t, T).item(), approx.item(), rel_tol=1e-2)
    # and the T^2 factor keeps the loss of the same logits on the same scale across temperatures
    assert kd_loss(s, t, 20.0).item() / kd_loss(s, t, 40.0).item() < 1.2


def test_kd_gradient_reaches_only_the_student():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    kd_loss(s, t, 4.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
