"""Distillation losses as pure functions of tensors, each with its formula and paper.

Every function takes student quantities first and teacher quantities second; the
teacher side is treated as a constant (callers pass detached tensors, and the
functions detach again so a gradient can only reach the student). Losses that
exponentiate or divide (DKD, CRD) compute in float32 whatever the autocast dtype.

Shapes: logits ``[B, C]``, stage features ``[B, C, H, W]``, embeddings ``[B, D]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# A finite stand-in for -inf when masking logits: exp() of it is exactly 0 in float32,
# and unlike -inf it never produces 0 * inf = nan in a KL sum or its gradient.
_MASKED = -1e9


# ----------------------------------------------------------------------------- logits


def kd_loss(logits_s: Tensor, logits_t: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` averaged over the batch. The
    ``T^2`` factor keeps the gradient magnitude independent of the temperature.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(logits_s / t, dim=1)
    log_p_t = F.log_softmax(logits_t.detach() / t, dim=1)
    # one fused kernel for sum_k p_t (log p_t - log p_s); "batchmean" divides by the batch size
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def hinton_terms(logits_s: Tensor, logits_t: Tensor, labels: Tensor, ce_weight: float, kd_weight: float,
                 temperature: float) -> dict[str, Tensor]:
    """Hinton's objective as the loop's named terms: ``ce_weight * CE(z_s, y)`` and
    ``kd_weight * kd_loss(z_s, z_t, T)`` (shared by KD and by methods that end in plain KD, e.g. AB)."""
    return {"ce": ce_weight * F.cross_entropy(logits_s, labels),
            "kd": kd_weight * kd_loss(logits_s, logits_t, temperature)}


def dkd_loss(
    logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0
) -> Tensor:
    """Zhao et al. 2022, "Decoupled Knowledge Distillation" (CVPR), eq. 7.

    With ``p = softmax(z / T)`` and the target class ``y``:

    - binary split ``b = [p_y, 1 - p_y]``; ``TCKD = KL(b_t || b_s)``;
    - non-target distribution ``p^ = softmax over the classes != y of z / T``;
      ``NCKD = KL(p^_t || p^_s)``;

    ``DKD = T^2 * (alpha * TCKD + beta * NCKD)``, batch mean. Classical KD is the
    special case ``KD = TCKD + (1 - p_t,y) * NCKD`` (the paper's eq. 5), i.e. NCKD is
    suppressed by the teacher's confidence; DKD decouples the two weights.
    All log-probabilities come from one log-softmax per side: ``log(1 - p_y)`` is the
    log-sum-exp of the non-target log-probabilities (never ``log(0)``), and
    ``log p^ = log p - log(1 - p_y)`` on the non-target classes. The teacher side is
    computed without autograd, so the student side costs about a dozen small kernels.
    """
    t = float(temperature)
    tgt = target.long()[:, None]
    gt = torch.zeros(logits_s.shape, dtype=torch.bool, device=logits_s.device).scatter_(1, tgt, True)
    log_p_s = (logits_s.float() / t).log_softmax(dim=1)
    with torch.no_grad():
        log_p_t = (logits_t.detach().float() / t).log_softmax(dim=1)
        log_y_t = log_p_t.gather(1, tgt).squeeze(1)  # log p_t,y
        log_o_t = log_p_t.masked_fill(gt, _MASKED).logsumexp(dim=1)  # log (1 - p_t,y)
        log_q_t = (log_p_t - log_o_t[:, None]).masked_fill(gt, _MASKED)  # log p^_t
    log_y_s = log_p_s.gather(1, tgt).squeeze(1)
    log_o_s = log_p_s.masked_fill(gt, _MASKED).logsumexp(dim=1)
    tckd = log_y_t.exp() * (log_y_t - log_y_s) + log_o_t.exp() * (log_o_t - log_o_s)
    log_q_s = (log_p_s - log_o_s[:, None]).masked_fill(gt, _MASKED)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="none", log_target=True).sum(dim=1)
    return (alpha * tckd.mean() + beta * nckd.mean()) * (t * t)


# ----------------------------------------------------------------------------- features


def hint_loss(feat_s: Tensor, feat_t: Tensor) -> Tensor:
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (ICLR).

    ``mean((r(f_s) - f_t)^2)`` over every element, where the caller has already
    applied the regressor ``r`` that maps the student's guided layer onto the shape of
    the teacher's hint layer.
    """
    return F.mse_loss(feat_s, feat_t.detach())


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of Zagoruyko & Komodakis 2017: ``Q = vec(mean_c |f_c|^p) / ||.||_2``, shape ``[B, H*W]``."""
    return F.normalize(feat.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(feat_s: Tensor, feat_t: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (ICLR), one pair of stages.

    ``mean_{b, j} (Q_s[b, j] - Q_t[b, j])^2`` with ``Q`` the :func:`attention_map`
    (the squared distance of the L2-normalised maps, averaged over batch and
    positions as the RepDistiller/mdistiller implementations do). Where the two maps
    differ in size, the larger is average-pooled to the smaller one (mdistiller). The
    loss is invariant to a positive scaling of either feature map. The method sums it
    over the paired stages and multiplies by its weight (1000 on CIFAR).
    """
    hs, ht = feat_s.shape[2:], feat_t.shape[2:]
    if hs != ht:
        side = (min(hs[0], ht[0]), min(hs[1], ht[1]))
        feat_s = F.adaptive_avg_pool2d(feat_s, side) if hs != side else feat_s
        feat_t = F.adaptive_avg_pool2d(feat_t, side) if ht != side else feat_t
    return (attention_map(feat_s, p) - attention_map(feat_t.detach(), p)).pow(2).mean()


def ab_loss(feat_s: Tensor, feat_t: Tensor, margin: float = 1.0) -> Tensor:
    """Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries" (AAAI), eq. 5.

    Pre-activation features; a neuron *fires* where its value is positive. The
    student (after its connector) is pushed to the same side of the boundary as the
    teacher, with a margin ``m``::

        sum  (s + m)^2 * [s > -m][t <= 0]  +  (s - m)^2 * [s <= m][t > 0]

    summed over channels and positions, divided by the batch size. It is zero
    exactly when every student neuron is beyond the margin on the teacher's side.
    """
    t = feat_t.detach()
    s = feat_s.float()
    off = (s + margin).pow(2) * ((s > -margin) & (t <= 0)).float()
    on = (s - margin).pow(2) * ((s <= margin) & (t > 0)).float()
    return (off + on).sum() / feat_s.shape[0]


def hcl_loss(feats_s: Sequence[Tensor], feats_t: Sequence[Tensor]) -> Tensor:
    """Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (CVPR): hierarchical context loss.

    For each pair of (fused student, teacher) features of side ``h``::

        l = [ MSE(f_s, f_t) + sum_{k in (4, 2, 1), k < h} w_k * MSE(pool_k(f_s), pool_k(f_t)) ] / (1 + sum w_k)

    with ``pool_k`` the adaptive average pool to ``k x k`` and weights ``1/2, 1/4, 1/8``
    for the levels actually used; the loss is the sum over the pairs. Features of
    side 1 (the pooled embedding) only get the plain MSE.
    """
    total = feats_s[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(feats_s, feats_t, strict=True):
        ft = ft.detach()
        h = fs.shape[2]
        loss = F.mse_loss(fs.float(), ft.float())
        weight, norm = 1.0, 1.0
        for k in (4, 2, 1):
            if k >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, k).float(), F.adaptive_avg_pool2d(ft, k).float())
            norm += weight
        total = total + loss / norm
    return total


# ----------------------------------------------------------------------------- embeddings


def _pairwise_distances(e: Tensor, eps: float) -> Tensor:
    """Euclidean distance matrix with a zero diagonal; squared distances are clamped at ``eps`` before the root."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    return d * (1.0 - torch.eye(e.shape[0], device=e.device, dtype=e.dtype))


def _angles(e: Tensor) -> Tensor:
    """Cosines of the angles ``<e_i - e_j, e_k - e_j>`` for every triple, flattened (``[B^3]``)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(
    emb_s: Tensor, emb_t: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0, eps: float = 1e-12
) -> Tensor:
    """Park et al. 2019, "Relational Knowledge Distillation" (CVPR), eq. 4-7.

    Distance-wise: ``psi_D(i, j) = ||e_i - e_j|| / mu`` with ``mu`` the mean distance
    over distinct pairs of the batch; angle-wise: ``psi_A(i, j, k) = cos angle(e_i - e_j,
    e_k - e_j)``. Both are compared with the Huber (smooth-L1) loss::

        RKD = distance_weight * huber(psi_D(s), psi_D(t)) + angle_weight * huber(psi_A(s), psi_A(t))

    Both relations are invariant to translating or positively scaling an embedding,
    so the loss is zero whenever ``emb_s = a * emb_t + b`` (``a > 0``).
    """
    s = emb_s.float().flatten(1)
    t = emb_t.detach().float().flatten(1)
    with torch.no_grad():
        d_t = _pairwise_distances(t, eps)
        d_t = d_t / d_t[d_t > 0].mean()
        a_t = _angles(t)
    d_s = _pairwise_distances(s, eps)
    d_s = d_s / d_s[d_s > 0].mean()
    loss_d = F.smooth_l1_loss(d_s, d_t)
    loss_a = F.smooth_l1_loss(_angles(s), a_t)
    return distance_weight * loss_d + angle_weight * loss_a


def crd_nce_loss(scores: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """Tian et al. 2020, "Contrastive Representation Distillation" (ICLR), the NCE objective, eq. 9-10.

    ``scores`` ``[B, 1 + K]`` are the memory-bank scores ``exp(<v, m_j> / tau) / Z``
    (an unnormalised ``P(data | pair)``), the positive first and ``K`` negatives
    after. With the uniform noise distribution ``P_n = 1 / N``::

        h(x) = x / (x + K * P_n)
        L = -( log h(pos) + sum_neg log(1 - h(neg)) ), batch mean

    ``eps`` guards the divisions as in the reference code.
    """
    x = scores.float()
    m = x.shape[1] - 1
    noise = m / float(num_data)
    pos = x[:, 0]
    neg = x[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + eps))
    log_d0 = torch.log(noise / (neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


# ----------------------------------------------------------------------------- SSKD helpers


def view_similarity(emb_views: Tensor, emb_sources: Tensor) -> Tensor:
    """Cosine similarity of every transformed view with every source image, ``[V, B]``.

    Xu et al. 2020, "Knowledge Distillation Meets Self-Supervision" (ECCV): row ``v``
    says how much view ``v`` looks like each of the ``B`` un-rotated images of the
    batch; the matching source is the contrastive target.
    """
    a = F.normalize(emb_views.float(), dim=1, eps=1e-8)
    b = F.normalize(emb_sources.float(), dim=1, eps=1e-8)
    return a @ b.t()


def target_rank(scores: Tensor, target: Tensor) -> Tensor:
    """Rank of the target column in each row of ``scores`` sorted descending (0 = the top score)."""
    tgt = scores.gather(1, target.long()[:, None])
    return (scores > tgt).sum(dim=1)


def well_ranked(rank: Tensor, keep_wrong: float) -> Tensor:
    """SSKD's selective transfer: indices (ascending) of the rows to distil.

    Every row the teacher ranks right (``rank == 0``) is kept, plus the
    ``int(keep_wrong * n_wrong)`` wrong rows with the best (lowest) ranks, ties in row
    order; the rest are dropped because the teacher's knowledge there is unreliable.
    """
    n_wrong = int((rank > 0).sum())
    keep = rank.numel() - n_wrong + int(n_wrong * keep_wrong)
    order = torch.sort(rank, stable=True).indices[:keep]
    return torch.sort(order).values


# ----------------------------------------------------------------------------- online (networks teaching each other)


def mutual_kl_loss(logits: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """Zhang et al. 2018, "Deep Mutual Learning" (CVPR), eq. 10: the mimicry part, summed over the peers.

    For ``K`` peers with ``p_k = softmax(z_k / T)``::

        L = sum_k 1/(K-1) * sum_{l != k} T^2 * KL(p_l || p_k)

    Every target ``p_l`` is detached (:func:`kd_loss`), so peer ``k`` receives the
    gradient of its own term only: summing the peers' losses and taking one step is
    DML's simultaneous update. ``T = 1`` is the paper's plain KL.
    """
    k = len(logits)
    if k < 2:
        raise ValueError(f"mutual learning needs at least 2 peers, got {k}")
    total = logits[0].new_zeros((), dtype=torch.float32)
    for i, z_i in enumerate(logits):
        for j, z_j in enumerate(logits):
            if i != j:
                total = total + kd_loss(z_i, z_j, temperature)
    return total / (k - 1)


def gated_ensemble(logits: Tensor, gate: Tensor) -> Tensor:
    """Lan et al. 2018, "Knowledge Distillation by On-the-Fly Native Ensemble" (NeurIPS), eq. 2.

    The on-the-fly teacher's logits ``z_e = sum_i g_i * z_i`` from branch logits
    ``[B, m, C]`` and gate weights ``[B, m]`` (rows sum to one) -> ``[B, C]``. Nothing
    is detached: the ensemble's own CE trains the gate and the branches.
    """
    return (gate.unsqueeze(-1) * logits).sum(dim=1)


def log_mean_probs(logits: Sequence[Tensor]) -> Tensor:
    """Logits of the averaged-probability ensemble: ``log(1/K * sum_k softmax(z_k))``, ``[B, C]``.

    Computed with log-sum-exp; ``softmax`` of the result is exactly the mean of the
    networks' probabilities, so argmax, NLL and calibration score the ensemble.
    """
    log_p = torch.stack([F.log_softmax(z.float(), dim=1) for z in logits])
    return torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(len(logits)), device=log_p.device))


def peer_attention(query: Tensor, key: Tensor, include_self: bool = False) -> Tensor:
    """Chen et al. 2020, "Online Knowledge Distillation with Diverse Peers" (AAAI), eq. 4.

    ``alpha_ab = exp(<L(h_a), E(h_b)>) / sum_f exp(<L(h_a), E(h_f)>)`` from query
    ``L(h)`` and key ``E(h)`` projections ``[B, m, d]`` of the peers' embeddings ->
    ``[B, m, m]``, every row summing to one. With ``include_self=False`` the diagonal
    is masked, so a peer's target mixes the *other* peers only (the paper's wording);
    the reference code keeps it.
    """
    energy = torch.bmm(query.float(), key.float().transpose(1, 2))
    if not include_self:
        m = energy.shape[1]
        if m < 2:
            raise ValueError("attention over the other peers needs at least 2 peers")
        eye = torch.eye(m, dtype=torch.bool, device=energy.device)
        energy = energy.masked_fill(eye, _MASKED)
    return energy.softmax(dim=-1)


def attention_kd_loss(logits_s: Tensor, logits_peers: Tensor, attention: Tensor, temperature: float = 3.0) -> Tensor:
    """OKDDip's first-level distillation (Chen et al. 2020, eq. 5), summed over the peers.

    Peer ``a``'s target is ``t_a = sum_b alpha_ab * z_b``, a mix of the peers'
    logits as in the reference code (``[B, m, m] @ [B, m, C]``), and::

        L = sum_a T^2 * KL(softmax(t_a / T) || softmax(z_a / T)), batch mean

    ``logits_peers`` is detached here: the gradient reaches the taught logits
    ``logits_s`` and the attention weights (so the query/key projections learn, as in
    the reference) but never a peer through its share of another peer's target.
    """
    t = float(temperature)
    targets = torch.bmm(attention.float(), logits_peers.detach().float())
    log_p_s = F.log_softmax(logits_s.float() / t, dim=2)
    log_p_t = F.log_softmax(targets / t, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=2)
    return kl.sum(dim=1).mean() * (t * t)
