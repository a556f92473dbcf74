"""DML: K peers trained together, each learning from the labels and from the others' predictions."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.config.training import check_model_name
from pipeline.distill.base import MethodContext
from pipeline.distill.losses import log_mean_probs, mutual_kl_loss
from pipeline.distill.online.common import OnlineDistiller, build_like
from pipeline.distill.registry import register_method


class DMLConfig(Strict):
    """Zhang et al. 2018, "Deep Mutual Learning" (CVPR): K peers, each CE + KL to the others' predictions."""

    num_peers: int = Field(2, ge=2, le=16, description="K, the number of peers (peer 0 has the student's architecture)")
    peer_models: list[str] = Field(default_factory=list, description="architectures of peers 1, 2, ... in order; peers not listed use the student's architecture")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="softmax temperature of the mutual KL (the paper: 1, plain probabilities)")
    ce_weight: float = Field(1.0, ge=0.0)
    kl_weight: float = Field(1.0, ge=0.0, description="weight of each peer's mean KL to the other peers")

    @model_validator(mode="after")
    def _peers(self) -> DMLConfig:
        for name in self.peer_models:
            check_model_name(name)
        if len(self.peer_models) > self.num_peers - 1:
            raise ValueError(f"peer_models lists {len(self.peer_models)} architectures but num_peers={self.num_peers} leaves room for {self.num_peers - 1}")
        return self


@register_method("dml", DMLConfig, offline=False)
class DML(OnlineDistiller):
    """Deep Mutual Learning (Zhang et al. 2018): K peers, each CE + mean KL to the others' detached predictions.

    Peer 0 is the student given to the run; peers 1..K-1 are built fresh, with the
    architectures listed in ``peer_models`` (the rest the student's). Per peer ``k``::

        L_k = ce_weight * CE(z_k, y) + kl_weight * 1/(K-1) * sum_{l != k} T^2 KL(p_l || p_k)

    with every target ``p_l`` detached. The paper updates the peers one after another
    within a batch; here the summed loss takes one step for all peers (the simultaneous
    update of common implementations), since each peer's gradient comes from its own
    term only. The ensemble head averages the peers' probabilities. The deployed network
    is the peer of the student's architecture with the best last-epoch validation top-1.
    """

    name = "dml"

    def __init__(self, student: nn.Module, cfg: DMLConfig, ctx: MethodContext) -> None:
        super().__init__(student, cfg, ctx)
        extra = cfg.num_peers - 1
        self.peer_archs: list[str] = [ctx.student_arch, *cfg.peer_models, *[ctx.student_arch] * (extra - len(cfg.peer_models))]
        self.others = nn.ModuleList(build_like(ctx, arch) for arch in self.peer_archs[1:])

    def peers(self) -> list[nn.Module]:
        """Peer 0 (the student) and the others, in order."""
        return [self.student, *self.others]

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = [peer(images) for peer in self.peers()]
        ce = sum(F.cross_entropy(z, labels) for z in logits)
        kl = mutual_kl_loss(logits, self.cfg.temperature)
        return logits[self._index(self.deployed)], {"ce": self.cfg.ce_weight * ce, "kl": self.cfg.kl_weight * kl}

    def heads(self, images: Tensor) -> dict[str, Tensor]:
        logits = [peer(images) for peer in self.peers()]
        return {**{f"peer{i}": z for i, z in enumerate(logits)}, "ensemble": log_mean_probs(logits)}

    def candidates(self) -> list[str]:
        return [f"peer{i}" for i, arch in enumerate(self.peer_archs) if arch == self.ctx.student_arch]

    def extract(self, name: str) -> nn.Module:
        return self.peers()[self._index(name)]

    @staticmethod
    def _index(name: str) -> int:
        return int(name.removeprefix("peer"))
