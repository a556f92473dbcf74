"""Contrastive representation distillation: NCE between student and teacher embeddings over a memory bank."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext
from pipeline.distill.losses import crd_nce_loss, kd_loss
from pipeline.distill.offline.common import require_staged, setup_error
from pipeline.distill.registry import register_method
from pipeline.engine.distributed import gather_cat


class Embed(nn.Module):
    """Linear projection to ``feat_dim`` followed by L2 normalisation (CRD's embedding head)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class ContrastMemory(nn.Module):
    """Two memory banks of past embeddings (student space and teacher space), one row per training sample.

    For a batch with sample indices ``idx`` it draws ``K`` negatives per sample,
    scores the *teacher* embedding against the student bank and the *student*
    embedding against the teacher bank (``exp(<v, m> / tau) / Z``), then moves the
    batch's rows towards the new embeddings with momentum ``m`` and renormalises.
    Everything that changes is a buffer, so a resumed run continues bit-identically.

    Negatives ("exact" mode of the reference): samples of other classes, drawn with
    replacement. The loop hands indices and labels but not the labels of the whole
    training set, so the bank records each sample's label when it is first seen and
    redraws (three rounds) negatives known to share the anchor's class or equal the
    anchor; in the first epoch not-yet-seen samples count as negatives. ``Z`` is fixed
    from the first batch (``mean score * N``), as in the reference.
    """

    def __init__(self, feat_dim: int, num_data: int, k: int, temperature: float, momentum: float) -> None:
        super().__init__()
        self.num_data, self.k = num_data, k
        self.temperature, self.momentum = temperature, momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("labels", torch.full((num_data,), -1, dtype=torch.long))
        self.register_buffer("z", torch.full((2,), -1.0))

    def sample(self, idx: Tensor, labels: Tensor) -> Tensor:
        """``[B, 1 + K]`` bank rows: the sample itself, then ``K`` negatives of other (known) classes."""
        b = idx.shape[0]
        neg = torch.randint(0, self.num_data, (b, self.k), device=idx.device)
        for _ in range(3):
            bad = (self.labels[neg] == labels[:, None]) | (neg == idx[:, None])
            neg = torch.where(bad, torch.randint(0, self.num_data, (b, self.k), device=idx.device), neg)
        return torch.cat([idx[:, None], neg], dim=1)

    def forward(self, v_s: Tensor, v_t: Tensor, idx: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Scores ``(student vs teacher bank, teacher vs student bank)``, each ``[B, 1 + K]``; updates the banks."""
        with torch.no_grad():
            # under DDP every rank updates the banks with the whole global batch, so they stay equal
            all_idx = gather_cat(idx)
            self.labels.index_copy_(0, all_idx, gather_cat(labels))
            rows = self.sample(idx, labels)
        b, d = v_s.shape
        with torch.autocast(device_type=v_s.device.type, enabled=False):
            v_s, v_t = v_s.float(), v_t.float()
            bank_s = self.memory_s.index_select(0, rows.flatten()).view(b, -1, d)
            bank_t = self.memory_t.index_select(0, rows.flatten()).view(b, -1, d)
            out_t = torch.exp(torch.bmm(bank_s, v_t[:, :, None]).squeeze(2) / self.temperature)
            out_s = torch.exp(torch.bmm(bank_t, v_s[:, :, None]).squeeze(2) / self.temperature)
            with torch.no_grad():
                if self.z[0] < 0:  # first batch ever: fix the normalisation constants (global batch mean)
                    means = gather_cat(torch.stack([out_s.mean(), out_t.mean()])[None]).mean(0)
                    self.z.copy_(means * self.num_data)
                for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    v_all = gather_cat(v.detach())
                    pos = bank.index_select(0, all_idx).mul_(self.momentum).add_(v_all * (1 - self.momentum))
                    bank.index_copy_(0, all_idx, F.normalize(pos, dim=1))
            return out_s / self.z[0], out_t / self.z[1]


class CRDConfig(Strict):
    """Tian et al. 2020, "Contrastive Representation Distillation" (NCE over a memory bank of embeddings)."""

    feat_dim: int = Field(128, ge=2, le=65536, description="dimension of the student and teacher embedding heads")
    nce_k: int = Field(16384, ge=1, description="negatives per sample (capped at the training-set size - 1)")
    nce_t: float = Field(0.07, gt=0.0, le=10.0, description="temperature of the contrastive scores")
    nce_m: float = Field(0.5, ge=0.0, lt=1.0, description="momentum of the memory-bank update")
    ce_weight: float = Field(1.0, ge=0.0)
    crd_weight: float = Field(0.8, ge=0.0)
    kd_weight: float = Field(0.0, ge=0.0, description="optional Hinton KD term (CRD+KD in the paper uses 1.0)")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="temperature of the optional KD term")


@register_method("crd", CRDConfig, offline=True)
class CRD(Distiller):
    """Tian et al. 2020: ``ce_weight * CE + crd_weight * (NCE_s + NCE_t) [+ kd_weight * KD]``.

    Student and teacher pooled embeddings go through their own linear + L2 heads
    (``feat_dim`` 128; both heads train with the student, the teacher backbone stays
    frozen) and are contrasted against memory banks of ``nce_k`` negatives
    (16384, capped at ``num_train - 1``), temperature 0.07, momentum 0.5. Needs the
    sample indices the loop hands (positions ``0..num_train - 1``). Heads and banks
    are dropped at deployment. Memory: two ``num_train x feat_dim`` banks, and a
    ``B x (1 + K) x feat_dim`` gather per step.
    """

    name = "crd"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: CRDConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg
        require_staged(self.name, ctx, student, teacher)
        if ctx.num_train < 2:
            raise setup_error(self.name, ctx, f"it needs at least 2 training samples for negatives, got {ctx.num_train}")
        self.num_data = ctx.num_train
        self.embed_s = Embed(student.feature_info.embedding_dim, cfg.feat_dim)
        self.embed_t = Embed(teacher.feature_info.embedding_dim, cfg.feat_dim)
        k = min(cfg.nce_k, ctx.num_train - 1)
        self.memory = ContrastMemory(cfg.feat_dim, ctx.num_train, k, cfg.nce_t, cfg.nce_m)

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats_t = self.teacher_features(images)
        out = self.student.forward_features(images)
        v_s, v_t = self.embed_s(out.embedding), self.embed_t(feats_t.embedding)
        scores_s, scores_t = self.memory(v_s, v_t, indices.long(), labels.long())
        contrast = crd_nce_loss(scores_s, self.num_data) + crd_nce_loss(scores_t, self.num_data)
        terms = {
            "ce": self.cfg.ce_weight * F.cross_entropy(out.logits, labels),
            "crd": self.cfg.crd_weight * contrast,
        }
        if self.cfg.kd_weight > 0:
            terms["kd"] = self.cfg.kd_weight * kd_loss(out.logits, feats_t.logits, self.cfg.temperature)
        return out.logits, terms
