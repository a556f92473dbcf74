"""What several offline methods share: setup errors, stage pairing, regressors, ramps, route checkpoints.

Nothing here trains by itself; the method modules compose these pieces.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.distill.base import MethodContext, MethodSetupError, freeze
from pipeline.engine.checkpoint import CheckpointError, load_torch, load_weights
from pipeline.models import FeatureNet, build, feature_shapes

ROUTE_FORMAT = "kdpipe-route/1"
_ROUTE_FILE = re.compile(r"^epoch_(\d{4,})\.pt$")


def setup_error(method: str, ctx: MethodContext, what: str) -> MethodSetupError:
    """A :class:`MethodSetupError` that names the method, both models and what is missing."""
    return MethodSetupError(
        f"method {method!r} cannot distil teacher {ctx.teacher_arch or '<unknown>'} into student "
        f"{ctx.student_arch}: {what}"
    )


def require_staged(method: str, ctx: MethodContext, student: nn.Module, teacher: nn.Module) -> None:
    """Feature methods need the positional feature API (``forward_features``) and stage maps on both networks."""
    for role, net in (("student", student), ("teacher", teacher)):
        if not isinstance(net, FeatureNet):
            raise setup_error(method, ctx, f"the {role} ({type(net).__name__}) has no feature API (forward_features)")
        if not net.feature_info.stages:
            raise setup_error(method, ctx, f"the {role} exposes no stage feature maps")


def require_preact(method: str, ctx: MethodContext, role: str, net: nn.Module, indices: list[int]) -> None:
    """Methods that compare pre-activation maps need them at every stage they use; name the first missing one."""
    assert isinstance(net, FeatureNet)
    missing = [i for i in indices if i in net.feature_info.preact_missing]
    if missing:
        arch = ctx.student_arch if role == "student" else ctx.teacher_arch
        raise setup_error(
            method, ctx,
            f"it needs the {role}'s pre-activation maps at stages {sorted(set(indices))}, but {arch} ends stage"
            f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} in an activation whose input its "
            "feature API does not expose (timm's forward_intermediates gives the activated map)",
        )


def probe(model: nn.Module, ctx: MethodContext) -> dict[str, list[tuple[int, ...]]]:
    """Per-sample shapes of a model's stage outputs and embedding at the run's input size."""
    assert isinstance(model, FeatureNet)
    return feature_shapes(model, ctx.in_channels, ctx.image_size)


def paired_stages(n_student: int, n_teacher: int, limit: int) -> list[tuple[int, int]]:
    """Stage index pairs ``(student, teacher)`` aligned at the deep end, at most ``limit`` of them.

    Networks of different depth are matched from their last stage backwards, so the
    deepest stages (the most semantic ones) are always compared. With ``limit`` 4 this
    reproduces the references on the CIFAR zoo: all three stages of ResNets/WRNs,
    VGG's blocks 1-4 (its first block is skipped) and MobileNetV2's four stages
    against the deepest four of a VGG.
    """
    k = min(n_student, n_teacher, limit)
    return [(n_student - k + i, n_teacher - k + i) for i in range(k)]


def resolve_stage(method: str, ctx: MethodContext, role: str, index: int | None, count: int) -> int:
    """A stage index (None = the middle stage, negative = from the end) checked against ``count`` stages."""
    if index is None:
        return count // 2
    if not -count <= index < count:
        arch = ctx.student_arch if role == "student" else ctx.teacher_arch
        raise setup_error(method, ctx, f"{role} {arch} has {count} stages, {role}_stage={index} does not exist")
    return index % count


class ConvRegressor(nn.Module):
    """Maps a student feature map onto a teacher's shape: conv (or transposed conv) + BN (+ ReLU).

    The FitNets regressor of RepDistiller/mdistiller (``ConvReg``): a student map twice
    the teacher's side uses a 3x3 stride-2 conv, half the side a 4x4 stride-2
    transposed conv, otherwise a valid conv of kernel ``1 + s - t`` (1x1 when the
    sides agree). A student map smaller than the teacher's by another factor cannot
    be adapted: :meth:`check` names the shapes.
    """

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...], relu: bool = True) -> None:
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        if s_h == 2 * t_h and s_w == 2 * t_w:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h and 2 * s_w == t_w:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"student map {s_shape} cannot be regressed onto teacher map {t_shape}")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU() if relu else nn.Identity()

    @staticmethod
    def fits(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> bool:
        """Whether a regressor from ``s_shape`` to ``t_shape`` (``(C, H, W)``) exists."""
        (_, s_h, s_w), (_, t_h, t_w) = s_shape, t_shape
        return (s_h >= t_h and s_w >= t_w) or (2 * s_h == t_h and 2 * s_w == t_w)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def ramp(epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up factor ``min(1, (epoch + 1) / warmup)`` for a 0-based epoch (mdistiller's 1-based ``epoch / warmup``)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)


# ----------------------------------------------------------------------------- the teacher's route


def route_checkpoints(method: str, ctx: MethodContext) -> dict[int, Path]:
    """The teacher's route checkpoints ``{epoch: path}`` (``teacher_dir/route/epoch_XXXX.pt``), sorted by epoch."""
    if ctx.teacher_dir is None:
        raise setup_error(method, ctx, "it needs the teacher's route checkpoints, but the run has no teacher folder")
    folder = Path(ctx.teacher_dir) / "route"
    found: dict[int, Path] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _ROUTE_FILE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    if not found:
        raise setup_error(
            method, ctx,
            f"it needs the teacher's route checkpoints in {folder} (kept every teacher.route_every epochs), found none",
        )
    return dict(sorted(found.items()))


def build_route_network(method: str, ctx: MethodContext) -> nn.Module:
    """A frozen network of the teacher's architecture, to be filled from route checkpoints."""
    if ctx.teacher_arch is None:
        raise setup_error(method, ctx, "the teacher architecture is unknown, so route checkpoints cannot be rebuilt")
    return freeze(build(ctx.teacher_arch, ctx.num_classes, ctx.in_channels, ctx.image_size))


def load_route_weights(method: str, ctx: MethodContext, network: nn.Module, path: Path) -> None:
    """Load one route checkpoint (``weights_only``) into ``network``; errors name the file and the method."""
    try:
        obj = load_torch(path, ROUTE_FORMAT)
        state = obj["state_dict"]
        with torch.no_grad():
            load_weights(network, state, path, f"teacher {ctx.teacher_arch}")
    except (CheckpointError, KeyError) as err:
        raise setup_error(method, ctx, f"unusable route checkpoint: {err}") from None


def nearest_epoch(epochs: list[int], wanted: float) -> int:
    """The available epoch closest to ``wanted`` (the later one on a tie)."""
    return min(epochs, key=lambda e: (abs(e - wanted), -e))


def equal_interval_epochs(epochs: list[int], count: int) -> list[int]:
    """``count`` route epochs at (nearly) equal intervals ending with the last one, without repeats.

    Targets are ``last * k / count`` for ``k = 1..count``, each snapped to the
    nearest available checkpoint; duplicates (too few checkpoints) are dropped.
    """
    last = epochs[-1]
    chosen: list[int] = []
    for k in range(1, count + 1):
        e = nearest_epoch(epochs, last * k / count)
        if e not in chosen:
            chosen.append(e)
    if chosen[-1] != last:
        chosen.append(last)
    return sorted(chosen)


def epochs_of(share: float, total: int) -> int:
    """``ceil(share * total)`` clipped to ``[0, total]``: how many of ``total`` epochs a share covers."""
    return max(0, min(total, math.ceil(share * total - 1e-9)))
