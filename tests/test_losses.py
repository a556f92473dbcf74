"""Loss functions against hand-computed values and the properties their papers state."""

from __future__ import annotations

import math

import torch

from pipeline.distill.losses import (
    ab_loss,
    at_loss,
    crd_nce_loss,
    dkd_loss,
    hcl_loss,
    hint_loss,
    kd_loss,
    rkd_loss,
    target_rank,
    view_similarity,
    well_ranked,
)


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    T = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [ps[1], ps[0]]
    kl = sum(q * math.log(q / p) for q, p in zip(pt, ps, strict=True))
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


# -- shared property helpers ----------------------------------------------------------------------

def _grad_only_to_student(loss_fn, s: torch.Tensor, t: torch.Tensor) -> None:
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    loss_fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


# -- DKD (Zhao et al. 2022) -------------------------------------------------------------------------

def test_dkd_loss_matches_hand_computation():
    s, t, y, T = [1.0, 0.0, -1.0], [0.0, 1.0, 0.5], 0, 2.0
    ps, pt = _softmax([v / T for v in s]), _softmax([v / T for v in t])
    tckd = _kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    nckd = _kl(_softmax([t[1] / T, t[2] / T]), _softmax([s[1] / T, s[2] / T]))
    alpha, beta = 1.0, 8.0
    expected = T * T * (alpha * tckd + beta * nckd)
    got = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), alpha, beta, T)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


def test_dkd_is_zero_for_equal_logits_and_decomposes_kd():
    torch.manual_seed(0)
    z = torch.randn(6, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    assert dkd_loss(z, z.clone(), y, 1.0, 8.0, 4.0).abs().item() < 1e-6
    # The paper's eq. 5: KD = TCKD + (1 - p_t[target]) * NCKD, per sample.
    s, t = torch.randn(1, 7), torch.randn(1, 7)
    y1 = torch.tensor([3])
    T = 3.0
    p_target = torch.softmax(t / T, dim=1)[0, 3].item()
    assert math.isclose(kd_loss(s, t, T).item(), dkd_loss(s, t, y1, 1.0, 1.0 - p_target, T).item(), rel_tol=1e-4)


def test_dkd_is_linear_in_alpha_beta_and_scales_with_temperature():
    torch.manual_seed(1)
    s, t, y = torch.randn(5, 6), torch.randn(5, 6), torch.randint(0, 6, (5,))
    tckd = dkd_loss(s, t, y, 1.0, 0.0, 4.0)
    nckd = dkd_loss(s, t, y, 0.0, 1.0, 4.0)
    assert torch.allclose(dkd_loss(s, t, y, 2.0, 8.0, 4.0), 2 * tckd + 8 * nckd, rtol=1e-5)
    # T^2 factor: DKD at T equals T^2 times DKD of the logits divided by T at temperature 1
    assert torch.allclose(dkd_loss(s, t, y, 1.0, 8.0, 4.0), 16 * dkd_loss(s / 4, t / 4, y, 1.0, 8.0, 1.0), rtol=1e-5)


def test_dkd_gradient_reaches_only_the_student():
    y = torch.tensor([0, 1, 2, 3])
    _grad_only_to_student(lambda s, t: dkd_loss(s, t, y, 1.0, 8.0, 4.0), torch.randn(4, 6), torch.randn(4, 6))


# -- FitNets hint, AT, AB -----------------------------------------------------------------------------

def test_hint_loss_is_the_mean_squared_error():
    s, t = torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[0.0, 4.0]]]])
    assert math.isclose(hint_loss(s, t).item(), (1 + 4) / 2)
    assert hint_loss(t, t.clone()).item() == 0
    _grad_only_to_student(hint_loss, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))


def test_at_loss_matches_hand_computation():
    # one channel, two positions: maps |f|^2 -> [1, 4] and [4, 1], each / sqrt(17)
    s = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    t = torch.tensor([2.0, 1.0]).view(1, 1, 1, 2)
    assert math.isclose(at_loss(s, t, p=2).item(), 9 / 17, rel_tol=1e-6)


def test_at_loss_properties():
    torch.manual_seed(0)
    f = torch.rand(3, 8, 4, 4)
    assert at_loss(f, f.clone()).item() < 1e-12
    assert at_loss(5.0 * f, f).item() < 1e-12  # attention maps are normalised: scale-free
    assert at_loss(torch.rand(3, 4, 4, 4), f).item() > 0  # channel counts may differ
    # larger maps are pooled to the smaller side (mdistiller)
    big = torch.rand(3, 8, 8, 8)
    assert torch.allclose(at_loss(big, f), at_loss(torch.nn.functional.adaptive_avg_pool2d(big, 4), f))
    _grad_only_to_student(at_loss, torch.rand(2, 3, 4, 4), torch.rand(2, 5, 4, 4))


def test_ab_loss_matches_hand_computation():
    s = torch.tensor([-2.0, 0.5, 0.5, 2.0]).view(1, 4, 1, 1)
    t = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1)
    # (-2-1)^2 + (0.5+1)^2 + (0.5-1)^2 + (2+1)^2
    assert math.isclose(ab_loss(s, t, margin=1.0).item(), 9 + 2.25 + 0.25 + 9)
    # batch mean: two copies of the sample give the same value
    assert math.isclose(ab_loss(s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1)).item(), 20.5)


def test_ab_loss_is_zero_beyond_the_margin_on_the_teachers_side():
    t = torch.randn(4, 6, 3, 3)
    s = torch.where(t > 0, 1.5, -1.5)
    assert ab_loss(s, t, margin=1.0).item() == 0
    assert ab_loss(-s, t, margin=1.0).item() > 0
    _grad_only_to_student(ab_loss, torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2))


# -- ReviewKD's hierarchical context loss ---------------------------------------------------------------

def test_hcl_loss_matches_hand_computation():
    fs = torch.zeros(1, 1, 2, 2)
    ft = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # side 2: plain MSE 7.5, plus the 1x1 pool level (weight 1/2): (2.5)^2; normalised by 1 + 1/2
    expected_2 = (7.5 + 0.5 * 6.25) / 1.5
    assert math.isclose(hcl_loss([fs], [ft]).item(), expected_2, rel_tol=1e-6)
    # side 1 (pooled embedding): plain MSE; the loss sums over pairs
    e_s, e_t = torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1)
    assert math.isclose(hcl_loss([fs, e_s], [ft, e_t]).item(), expected_2 + 1.0, rel_tol=1e-6)


def test_hcl_loss_pyramid_levels_and_properties():
    torch.manual_seed(0)
    fs, ft = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mse = torch.nn.functional.mse_loss
    pool = torch.nn.functional.adaptive_avg_pool2d
    levels = mse(fs, ft) + 0.5 * mse(pool(fs, 4), pool(ft, 4)) + 0.25 * mse(pool(fs, 2), pool(ft, 2)) \
        + 0.125 * mse(pool(fs, 1), pool(ft, 1))
    assert torch.allclose(hcl_loss([fs], [ft]), levels / (1 + 0.5 + 0.25 + 0.125), rtol=1e-5)
    assert hcl_loss([ft], [ft.clone()]).item() == 0
    _grad_only_to_student(lambda s, t: hcl_loss([s], [t]), fs, ft)


# -- RKD ----------------------------------------------------------------------------------------------------

def _huber_mean(a: list[float], b: list[float]) -> float:
    out = 0.0
    for x, y in zip(a, b, strict=True):
        d = abs(x - y)
        out += 0.5 * d * d if d < 1 else d - 0.5
    return out / len(a)


def _rkd_by_hand(s: list[list[float]], t: list[list[float]], wd: float, wa: float) -> float:
    def dist(e):
        n = len(e)
        d = [[math.dist(e[i], e[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        flat = [v for row in d for v in row]
        mu = sum(v for v in flat if v > 0) / sum(1 for v in flat if v > 0)
        return [v / mu for v in flat]

    def angles(e):
        n = len(e)
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u = [a - b for a, b in zip(e[j], e[i], strict=True)]
                    v = [a - b for a, b in zip(e[k], e[i], strict=True)]
                    nu, nv = math.hypot(*u), math.hypot(*v)
                    out.append(0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v, strict=True)) / (nu * nv))
        return out

    return wd * _huber_mean(dist(s), dist(t)) + wa * _huber_mean(angles(s), angles(t))


def test_rkd_loss_matches_hand_computation():
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    s = [[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]]
    expected = _rkd_by_hand(s, t, 25.0, 50.0)
    got = rkd_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), 25.0, 50.0)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)
    only_d = rkd_loss(torch.tensor(s), torch.tensor(t), 1.0, 0.0).item()
    assert math.isclose(only_d, _rkd_by_hand(s, t, 1.0, 0.0), rel_tol=1e-5)


def test_rkd_loss_is_invariant_to_scale_and_translation():
    torch.manual_seed(0)
    t = torch.randn(8, 5, dtype=torch.float64)
    assert rkd_loss(t.clone(), t).item() < 1e-10
    assert rkd_loss(3.0 * t + 2.0, t).item() < 1e-10
    assert rkd_loss(torch.randn(8, 5, dtype=torch.float64), t).item() > 0
    # the dimensions of student and teacher embeddings may differ
    assert rkd_loss(torch.randn(8, 3), torch.randn(8, 7)).item() > 0
    _grad_only_to_student(rkd_loss, torch.randn(6, 4), torch.randn(6, 9))


# -- CRD's NCE objective ------------------------------------------------------------------------------------

def test_crd_nce_loss_matches_hand_computation():
    a, b, c, n = 0.5, 0.1, 0.2, 10
    noise = 2 / n  # K * P_n with K = 2 negatives
    expected = -(math.log(a / (a + noise)) + math.log(noise / (b + noise)) + math.log(noise / (c + noise)))
    got = crd_nce_loss(torch.tensor([[a, b, c]]), n, eps=0.0)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_crd_nce_loss_rewards_the_positive_and_punishes_negatives():
    base = torch.tensor([[0.5, 0.1, 0.2]])
    assert crd_nce_loss(base * torch.tensor([[2.0, 1, 1]]), 10) < crd_nce_loss(base, 10)
    assert crd_nce_loss(base * torch.tensor([[1.0, 2, 2]]), 10) > crd_nce_loss(base, 10)
    scores = torch.rand(4, 9, requires_grad=True)
    crd_nce_loss(scores, 100).backward()
    assert (scores.grad[:, 0] < 0).all() and (scores.grad[:, 1:] > 0).all()


# -- SSKD's selective transfer ---------------------------------------------------------------------------------

def test_view_similarity_and_selective_ranking():
    views = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    sources = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    sim = view_similarity(views, sources)
    assert torch.allclose(sim, torch.tensor([[1.0, 0.0], [0.0, 1.0], [2**-0.5, 2**-0.5]]), atol=1e-6)
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    assert target_rank(scores, torch.tensor([0, 0, 0])).tolist() == [0, 2, 2]
    rank = torch.tensor([0, 2, 1, 0, 3])
    assert well_ranked(rank, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert well_ranked(rank, 0.5).tolist() == [0, 2, 3]  # 3 wrong rows, keep int(1.5) = 1: the best ranked
    assert well_ranked(rank, 0.0).tolist() == [0, 3]
