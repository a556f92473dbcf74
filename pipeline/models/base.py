"""The feature API every model of the registry implements.

Distillation methods need more than logits: stage outputs (before and after the
stage's last activation), the pooled embedding, and the channel/stride layout of
the network. Every model here is a :class:`StagedNet`, a fixed skeleton

    stem -> stages[0] -> ... -> stages[-1] -> neck -> global average pool
         -> pre_logits -> (dropout) -> classifier

so a method can read features by position instead of hooking module names, and
online methods (ONE) can split a network into shared low layers and branch heads.
``pre_logits`` is the identity except where a family has a hidden layer after the
pooling (torchvision's MobileNetV3); the dropout only where the family has one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class ModelOutput:
    """Everything one forward pass exposes to a distillation method.

    ``stages`` holds each stage's output after its last activation, ``preact`` the
    same tensors before that activation (equal to ``stages`` where a stage ends
    without one), ``embedding`` the pooled, flattened vector fed to the classifier.
    """

    logits: Tensor
    stages: list[Tensor]
    preact: list[Tensor | None]
    embedding: Tensor


@dataclass(frozen=True)
class StageInfo:
    """Static layout of one stage: output channels and total stride from the input."""

    channels: int
    reduction: int


@dataclass
class FeatureInfo:
    """Channel and stride metadata of a model, known without running it."""

    stages: list[StageInfo] = field(default_factory=list)
    embedding_dim: int = 0
    #: stage indices whose pre-activation map the model cannot expose (their ``preact`` entry is None)
    preact_missing: tuple[int, ...] = ()

    @property
    def channels(self) -> list[int]:
        return [s.channels for s in self.stages]


class Stage(nn.Module):
    """A stage returns ``(post, pre)``: its output after and before its last activation.

    The default wraps a sequence of blocks followed by an optional activation; the
    model families override it where the last block owns its activation.
    """

    def __init__(self, blocks: nn.Module, act: nn.Module | None = None) -> None:
        super().__init__()
        self.blocks = blocks
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D401
        pre = self.blocks(x)
        return self.act(pre), pre


PreactFn = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]
"""Runs one block on ``x`` and returns ``(post, pre)`` around the block's last activation."""


class BlockStage(Stage):
    """A stage of blocks where the last block owns the stage's last activation.

    Residual-style blocks apply their activation after the skip addition, so the
    pre-activation output only exists inside the last block. Every block but the
    last runs through its ordinary ``forward``; the last one runs through
    ``preact_fn(block, x)`` or, when that is not given, the block's own
    ``forward_preact(x)`` method, both returning ``(post, pre)``. The blocks stay
    the same modules (a torchvision ``layer1`` can be passed as is), so parameter
    names and weights are shared with the network they come from.
    """

    def __init__(self, blocks: nn.Sequential, preact_fn: PreactFn | None = None) -> None:
        super().__init__(blocks)
        if len(blocks) == 0:
            raise ValueError("a BlockStage needs at least one block")
        self.preact_fn = preact_fn

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D401
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i == last:
                if self.preact_fn is not None:
                    return self.preact_fn(block, x)
                return block.forward_preact(x)
            x = block(x)
        raise AssertionError("unreachable: a BlockStage always has a last block")


class FeatureNet(nn.Module):
    """What every network of the registry offers a distillation method: logits and features by position.

    ``forward`` returns logits only, so the deployed and exported network is the
    plain model; ``forward_features`` returns a :class:`ModelOutput`;
    ``feature_info`` describes the stages without running the model;
    ``pretrained_keys`` names the state-dict entries loaded from a weights file (empty
    when trained from scratch), which fine-tuning treats as the pretrained backbone.
    """

    feature_info: FeatureInfo
    num_classes: int
    pretrained_keys: frozenset[str] = frozenset()

    def forward_features(self, x: Tensor) -> ModelOutput:
        """Full forward pass with every intermediate a distillation method may need."""
        raise NotImplementedError

    def export_form(self) -> nn.Module:
        """The network to export: itself, or an equivalent re-parameterised copy (fused branches)."""
        return self


class StagedNet(FeatureNet):
    """A network assembled as stem -> stages -> neck -> pool -> pre_logits -> classifier.

    Besides the feature API it can be split at a stage boundary (shared low layers
    and branch heads for ONE and OKDDip), since its parts are attributes.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: list[nn.Module],
        neck: nn.Module | None,
        embedding_dim: int,
        num_classes: int,
        stage_info: list[StageInfo],
        *,
        pre_logits: nn.Module | None = None,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.neck = neck if neck is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        # Optional hidden layer between the pooled vector and the classifier; its
        # output is the embedding. Dropout sits after the embedding, so methods that
        # compare embeddings (RKD, CRD) see them undropped.
        self.pre_logits = pre_logits if pre_logits is not None else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.feature_info = FeatureInfo(stages=list(stage_info), embedding_dim=embedding_dim)
        self.num_classes = num_classes

    def forward_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Run stem and stages; return the last stage output and the per-stage lists."""
        x = self.stem(x)
        posts: list[Tensor] = []
        pres: list[Tensor] = []
        for stage in self.stages:
            x, pre = stage(x)
            posts.append(x)
            pres.append(pre)
        return x, posts, pres

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """From the last stage output to ``(embedding, logits)``."""
        emb = self.pre_logits(torch.flatten(self.pool(self.neck(x)), 1))
        return emb, self.classifier(self.head_drop(emb))

    def forward_features(self, x: Tensor) -> ModelOutput:
        """Full forward pass with every intermediate a distillation method may need."""
        last, posts, pres = self.forward_stages(x)
        emb, logits = self.forward_head(last)
        return ModelOutput(logits=logits, stages=posts, preact=pres, embedding=emb)

    def forward(self, x: Tensor) -> Tensor:
        last, _, _ = self.forward_stages(x)
        return self.forward_head(last)[1]


def init_fan_out_weights(model: nn.Module) -> None:
    """The VGG/MobileNetV2 reference initialisation: Kaiming fan-out convs, unit BN, N(0, 0.01) classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of a module."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def feature_shapes(model: FeatureNet, in_channels: int, image_size: int) -> dict[str, list[tuple[int, ...]]]:
    """Shapes (without batch) of every stage output and of the embedding, probed on zeros.

    A pre-activation the model cannot expose has the shape of its stage's output
    (methods check ``feature_info.preact_missing`` before they use one).
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        out = model.forward_features(torch.zeros(2, in_channels, image_size, image_size, device=param.device))
    finally:
        model.train(was_training)
    return {
        "stages": [tuple(t.shape[1:]) for t in out.stages],
        "preact": [tuple((p if p is not None else t).shape[1:]) for p, t in zip(out.preact, out.stages, strict=True)],
        "embedding": [tuple(out.embedding.shape[1:])],
    }
