"""ONE: shared low layers, m branches and a gate mixing them into an on-the-fly ensemble teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import MethodContext
from pipeline.distill.losses import gated_ensemble, kd_loss
from pipeline.distill.online.common import MultiBranchNet, OnlineDistiller, build_like, probe_channels, resolve_split
from pipeline.distill.registry import register_method


class Gate(nn.Module):
    """ONE's gate: global average pool of the shared features, FC to m, BN, ReLU, softmax -> ``[B, m]``.

    The layers of the reference (``avgpool_c``, ``control_v1``, ``bn_v1``, ReLU, softmax);
    each row sums to one.
    """

    def __init__(self, channels: int, num_branches: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(F.relu(self.bn(self.fc(torch.flatten(self.pool(x), 1)))), dim=1)


class ONEConfig(Strict):
    """Lan et al. 2018, "Knowledge Distillation by On-the-Fly Native Ensemble" (NeurIPS)."""

    num_branches: int = Field(3, ge=2, le=16, description="m, the branches on top of the shared low layers")
    shared_stages: int | None = Field(None, ge=0, description="stages shared by every branch (the stem always is); null = all but the last stage")
    temperature: float = Field(3.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1.0, ge=0.0, description="CE of every branch")
    ensemble_ce_weight: float = Field(1.0, ge=0.0, description="CE of the gated ensemble")
    kl_weight: float = Field(1.0, ge=0.0, description="T^2 KL from the detached ensemble to every branch (ramped)")
    rampup_epochs: int | None = Field(None, ge=0, description="sigmoid ramp of the KL weight (80 epochs of 300 in the reference); null = round(80/300 x epochs); 0 = none")


@register_method("one", ONEConfig, offline=False)
class ONE(OnlineDistiller):
    """On-the-Fly Native Ensemble (Lan et al. 2018): m branches over shared low layers teach each other via a gated ensemble.

    Any zoo model splits into shared low layers (stem + the first ``shared_stages``
    stages; default all but the last) and ``num_branches`` branches (the remaining
    stages, neck and classifier of freshly built networks of the same architecture,
    so every branch has its own initialisation, as the reference). The gate weights
    the branch logits into the ensemble ``z_e = sum_i g_i z_i``. Loss::

        ce_weight * sum_i CE(z_i, y) + ensemble_ce_weight * CE(z_e, y)
            + ramp(epoch) * kl_weight * sum_i T^2 KL(softmax(z_e/T).detach() || softmax(z_i/T))

    with T=3 and the reference's sigmoid ramp (80 of 300 epochs; ``rampup_epochs``).
    After training, the branch with the best last-epoch validation top-1 is extracted,
    with the shared layers, into a plain StagedNet whose weights equal those parts.
    """

    name = "one"

    def __init__(self, student: nn.Module, cfg: ONEConfig, ctx: MethodContext) -> None:
        split = resolve_split("one", ctx.student_arch, student, cfg.shared_stages)
        net = MultiBranchNet([student, *[build_like(ctx) for _ in range(cfg.num_branches - 1)]], split)
        super().__init__(net, cfg, ctx)
        self.gate = Gate(probe_channels(net.trunk, ctx), cfg.num_branches)

    def _outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Branch logits ``[B, m, C]`` and the gated ensemble's ``[B, C]``."""
        shared, outs = self.student(images)
        logits = torch.stack([z for _, z in outs], dim=1)
        return logits, gated_ensemble(logits, self.gate(shared))

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, ens = self._outputs(images)
        m, cfg = logits.shape[1], self.cfg
        target = ens.detach()
        ce = sum(F.cross_entropy(logits[:, i], labels) for i in range(m))
        kl = sum(kd_loss(logits[:, i], target, cfg.temperature) for i in range(m))
        return logits[:, self._index(self.deployed)], {
            "ce": cfg.ce_weight * ce,
            "ce_ensemble": cfg.ensemble_ce_weight * F.cross_entropy(ens, labels),
            "kl": self.ramp() * cfg.kl_weight * kl,
        }

    def heads(self, images: Tensor) -> dict[str, Tensor]:
        logits, ens = self._outputs(images)
        return {**{f"branch{i}": logits[:, i] for i in range(logits.shape[1])}, "ensemble": ens}

    def candidates(self) -> list[str]:
        return [f"branch{i}" for i in range(self.cfg.num_branches)]

    def extract(self, name: str) -> nn.Module:
        return self.student.extract(self._index(name), self.ctx)

    @staticmethod
    def _index(name: str) -> int:
        return int(name.removeprefix("branch"))
