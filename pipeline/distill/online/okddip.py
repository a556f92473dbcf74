"""OKDDip: peers learn from attention-weighted mixes of each other; a leader learns from the peers' mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import MethodContext
from pipeline.distill.losses import attention_kd_loss, kd_loss, peer_attention
from pipeline.distill.online.common import MultiBranchNet, OnlineDistiller, build_like, resolve_split
from pipeline.distill.registry import register_method


class OKDDipConfig(Strict):
    """Chen et al. 2020, "Online Knowledge Distillation with Diverse Peers" (AAAI): attention-weighted peer targets and a leader."""

    num_peers: int = Field(3, ge=2, le=16, description="auxiliary peers (the reference's num_branches=4 is 3 peers + the leader)")
    shared_stages: int | None = Field(None, ge=0, description="stages shared by peers and leader (the stem always is); null = all but the last stage, as the reference")
    temperature: float = Field(3.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1.0, ge=0.0, description="CE of every peer and of the leader")
    peer_kl_weight: float = Field(1.0, ge=0.0, description="first level: each peer's T^2 KL to its attention-weighted target (ramped)")
    leader_kl_weight: float = Field(1.0, ge=0.0, description="second level: the leader's T^2 KL to the peers' mean (ramped)")
    proj_factor: int = Field(8, ge=1, le=1024, description="query/key projections map the embedding to embedding_dim // proj_factor (at least 1)")
    include_self: bool = Field(False, description="let a peer's own prediction enter its target (the reference code does; the paper's text says the other peers)")
    rampup_epochs: int | None = Field(None, ge=0, description="sigmoid ramp of both KL terms; null = round(80/300 x epochs); 0 = none")


@register_method("okddip", OKDDipConfig, offline=False)
class OKDDip(OnlineDistiller):
    """Online Knowledge Distillation with Diverse Peers (Chen et al. 2020): two-level distillation, the leader deployed.

    As the reference code, the ``num_peers`` peers and the leader are branches over
    shared low layers (ONE's split: all but the last stage by default), each freshly
    initialised; the leader is the last branch. Shared query ``L`` and key ``E``
    projections (no bias, ``embedding_dim // proj_factor`` wide) of each peer's
    embedding give attention weights ``alpha_ab = softmax_b(<L(h_a), E(h_b)>)``; peer
    ``a``'s target mixes the peers' logits ``t_a = sum_b alpha_ab z_b`` (the other
    peers only, unless ``include_self``). Loss::

        ce_weight * (sum_a CE(z_a, y) + CE(z_leader, y))
            + ramp(epoch) * (peer_kl_weight * sum_a T^2 KL(softmax(t_a/T) || softmax(z_a/T))
                             + leader_kl_weight * T^2 KL(softmax(mean_a z_a / T) || softmax(z_leader/T)))

    with T=3 and the reference's sigmoid ramp. Gradients (our choice, stated in
    docs/online.md): the targets carry none into the peers' logits or embeddings (the
    reference lets them flow); the attention weights stay differentiable, so the
    projections learn from the first-level term, as in the reference. The ensemble
    head is the peers' mean logits, the leader's teacher (the reference's "ensemble"
    accuracy). The leader, with the shared layers, is deployed as a plain StagedNet.
    """

    name = "okddip"

    def __init__(self, student: nn.Module, cfg: OKDDipConfig, ctx: MethodContext) -> None:
        split = resolve_split("okddip", ctx.student_arch, student, cfg.shared_stages)
        emb_dim = student.feature_info.embedding_dim
        net = MultiBranchNet([student, *[build_like(ctx) for _ in range(cfg.num_peers)]], split)
        super().__init__(net, cfg, ctx)
        proj = max(1, emb_dim // cfg.proj_factor)
        self.query = nn.Linear(emb_dim, proj, bias=False)
        self.key = nn.Linear(emb_dim, proj, bias=False)

    def _outputs(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Peer logits ``[B, m, C]``, peer embeddings ``[B, m, D]`` and the leader's logits ``[B, C]``."""
        _, outs = self.student(images)
        peers, (_, leader) = outs[:-1], outs[-1]
        return torch.stack([z for _, z in peers], dim=1), torch.stack([h for h, _ in peers], dim=1), leader

    def attention(self, embeddings: Tensor) -> Tensor:
        """Attention weights ``[B, m, m]`` from the (detached) peer embeddings."""
        h = embeddings.detach()
        return peer_attention(self.query(h), self.key(h), self.cfg.include_self)

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, emb, leader = self._outputs(images)
        cfg, ramp = self.cfg, self.ramp()
        ce = sum(F.cross_entropy(logits[:, i], labels) for i in range(logits.shape[1]))
        kl_peers = attention_kd_loss(logits, logits.detach(), self.attention(emb), cfg.temperature)
        kl_leader = kd_loss(leader, logits.detach().mean(dim=1), cfg.temperature)
        return leader, {
            "ce": cfg.ce_weight * ce,
            "ce_leader": cfg.ce_weight * F.cross_entropy(leader, labels),
            "kl_peers": ramp * cfg.peer_kl_weight * kl_peers,
            "kl_leader": ramp * cfg.leader_kl_weight * kl_leader,
        }

    def heads(self, images: Tensor) -> dict[str, Tensor]:
        logits, _, leader = self._outputs(images)
        peers = {f"peer{i}": logits[:, i] for i in range(logits.shape[1])}
        return {**peers, "leader": leader, "ensemble": logits.mean(dim=1)}

    def candidates(self) -> list[str]:
        return ["leader"]

    def extract(self, name: str) -> nn.Module:
        if name != "leader":
            raise ValueError(f"okddip deploys its leader, not {name!r}")
        return self.student.extract(self.cfg.num_peers, self.ctx)
