"""Activation boundaries: a boundary-transfer initialisation phase, then KD."""

from __future__ import annotations

import math
from collections.abc import Iterator

from pydantic import Field
from torch import Tensor, nn

from pipeline.config.base import Strict
from pipeline.distill.base import Distiller, MethodContext, Phase
from pipeline.distill.losses import ab_loss, hinton_terms
from pipeline.distill.offline.common import (
    ConvRegressor,
    paired_stages,
    probe,
    require_preact,
    require_staged,
    setup_error,
)
from pipeline.distill.registry import register_method


def _connector(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> nn.Module:
    """Identity where shapes agree, else conv + BN without activation (the boundary is read before ReLU).

    Equal sides give the paper's 1x1 conv + BN; other sides RepDistiller's regressor.
    Initialised as the reference: conv weights N(0, sqrt(2 / (k*k*out))), BN 1 / 0.
    """
    if tuple(s_shape) == tuple(t_shape):
        return nn.Identity()
    reg = ConvRegressor(s_shape, t_shape, relu=False)
    conv = reg.conv
    k = conv.kernel_size[0] * conv.kernel_size[1]
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * conv.out_channels)))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return reg


class ABInit(Distiller):
    """Phase 1 of AB: student and connectors learn the teacher's activation boundaries (no labels).

    ``ab_weight * sum_i 2^(i - n + 1) * ab_loss(connector_i(pre_s_i), pre_t_i)`` over
    the ``n`` paired stages (the deepest weighs 1, each shallower half as much),
    as in the reference code.
    """

    name = "ab_init"

    def __init__(self, student: nn.Module, teacher: nn.Module, connectors: nn.ModuleList,
                 pairs: list[tuple[int, int]], cfg: ABConfig) -> None:
        super().__init__(student, teacher)
        self.connectors = connectors
        self.pairs = pairs
        self.cfg = cfg

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        pre_t = self.teacher_features(images).preact
        out = self.student.forward_features(images)
        n = len(self.pairs)
        loss = sum(
            2.0 ** (k - n + 1) * ab_loss(conn(out.preact[i]), pre_t[j], self.cfg.margin)
            for k, ((i, j), conn) in enumerate(zip(self.pairs, self.connectors, strict=True))
        )
        return out.logits, {"ab": self.cfg.ab_weight * loss}


class ABConfig(Strict):
    """Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"."""

    init_epochs: int = Field(30, ge=0, le=10000, description="epochs of the boundary-transfer initialisation phase (student + connectors); 0 skips it")
    init_lr: float | None = Field(None, gt=0.0, le=10.0, description="lr of the initialisation phase; null = the run's lr (RepDistiller)")
    margin: float = Field(1.0, gt=0.0, description="margin of the alternative (hinge-squared) boundary loss")
    ab_weight: float = Field(0.003, gt=0.0, description="scale of the boundary loss (the references' 3/1000)")
    stages: int = Field(4, ge=1, le=16, description="pair the deepest N stages (pre-activation features)")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="KD temperature of the main phase")
    ce_weight: float = Field(0.1, ge=0.0, description="main phase: CE weight")
    kd_weight: float = Field(0.9, ge=0.0, description="main phase: KD weight (0 with ce_weight 1 reproduces RepDistiller's AB row)")


@register_method("ab", ABConfig, offline=True)
class AB(Distiller):
    """Heo et al. 2019: boundary-transfer initialisation (phase ``ab_init``), then ``ce * CE + kd * KD``.

    Phase 1 trains the student and per-stage connectors on the alternative boundary
    loss over pre-activation features for ``init_epochs`` epochs (RepDistiller: 30, at
    the run's lr). The main run is Hinton KD (T = 4, 0.1 / 0.9 as the KD row) as
    the paper's classification stage; ``kd_weight 0, ce_weight 1`` gives the CRD
    benchmark's AB row. Connectors are dropped at deployment. Paired stages must have
    maps the connectors can map (equal, larger, or half the side).
    """

    name = "ab"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: ABConfig, ctx: MethodContext) -> None:
        super().__init__(student, teacher)
        self.cfg = cfg
        require_staged(self.name, ctx, student, teacher)
        s_shapes, t_shapes = probe(student, ctx)["preact"], probe(teacher, ctx)["preact"]
        self.pairs = paired_stages(len(s_shapes), len(t_shapes), cfg.stages)
        require_preact(self.name, ctx, "student", student, [i for i, _ in self.pairs])
        require_preact(self.name, ctx, "teacher", teacher, [j for _, j in self.pairs])
        for i, j in self.pairs:
            if not ConvRegressor.fits(s_shapes[i], t_shapes[j]):
                raise setup_error(
                    self.name, ctx,
                    f"student stage {i} {tuple(s_shapes[i])} cannot be connected to teacher stage {j} "
                    f"{tuple(t_shapes[j])}: boundaries are compared position by position, so the student map must be "
                    "as large as the teacher's (or half its side)",
                )
        self.connectors = nn.ModuleList(_connector(s_shapes[i], t_shapes[j]) for i, j in self.pairs)

    def phases(self) -> list[Phase]:
        if self.cfg.init_epochs == 0:
            return []
        init = ABInit(self.student, self.teacher, self.connectors, self.pairs, self.cfg)
        return [Phase("ab_init", init, self.cfg.init_epochs, lr=self.cfg.init_lr)]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The main run trains the student only; the connectors served the initialisation."""
        return (p for p in self.student.parameters() if p.requires_grad)

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits_t = self.teacher_forward(images)
        logits_s = self.student(images)
        c = self.cfg
        return logits_s, hinton_terms(logits_s, logits_t, labels, c.ce_weight, c.kd_weight, c.temperature)
