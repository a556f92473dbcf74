"""What the online methods share.

- :class:`OnlineDistiller`: the base of DML, ONE, OKDDip and EKD. A method names every
  trained network's logits (``heads``, plus an ``ensemble`` head), which of them may be
  deployed (``candidates``: networks of the student's architecture) and how to turn
  one into a plain zoo network (``extract``). The base picks the deployed network after
  training from the last epoch's validation accuracy, and reports what the run costs:
  parameters and MACs of everything trained vs the one network deployed.
- :class:`MultiBranchNet`: ONE's (and OKDDip's) network. Shared low layers (a zoo
  network's stem and first stages) and ``m`` branches, each the remaining stages, neck
  and classifier of a zoo network of the same architecture. The parts keep the
  :class:`~pipeline.models.StagedNet` attribute names, so a branch maps back onto a
  plain ``StagedNet`` by shifting its stage indices: the deployed network's weights
  are exactly the shared layers plus that branch.
- :func:`sigmoid_rampup`, the consistency ramp of the ONE and OKDDip reference code.
- The ensemble file (``runs/<method>/<student>/ensemble.pt``): every trained network of
  an online run, self-describing (method, its params, the data shape), loaded with
  ``weights_only=True``, so the evaluate stage scores the ensemble on the test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn
from torch.utils.data import Dataset

from pipeline.distill.base import Distiller, MethodContext, MethodSetupError
from pipeline.engine.checkpoint import CheckpointError, load_torch, save_torch
from pipeline.engine.evaluation import predict, topk_accuracy
from pipeline.models import StagedNet, build, count_parameters
from pipeline.models.complexity import count_macs

ENSEMBLE_FORMAT = "kdpipe-ensemble/1"
REFERENCE_RAMP_SHARE = 80 / 300
"""ONE and OKDDip ramp their KL terms over the first 80 of 300 epochs (``--consistency_rampup 80``)."""


def sigmoid_rampup(epoch: float, length: float) -> float:
    """Laine & Aila 2017 ramp, as the ONE/OKDDip code: ``exp(-5 (1 - t/L)^2)`` for ``t < L``, then 1.

    ``t`` is the 0-based epoch (constant within an epoch, as the references); ``L <= 0``
    means no ramp.
    """
    if length <= 0:
        return 1.0
    t = min(max(float(epoch), 0.0), float(length))
    phase = 1.0 - t / float(length)
    return math.exp(-5.0 * phase * phase)


def ramp_length(rampup_epochs: int | None, epochs: int) -> int:
    """The ramp length of a run: the configured epochs, or the references' share (80/300) of its schedule."""
    return round(REFERENCE_RAMP_SHARE * epochs) if rampup_epochs is None else int(rampup_epochs)


def build_like(ctx: MethodContext, arch: str | None = None) -> StagedNet:
    """A freshly initialised zoo network for this run's data (the student's architecture by default)."""
    return build(arch or ctx.student_arch, num_classes=ctx.num_classes, in_channels=ctx.in_channels,
                 image_size=ctx.image_size)


# ----------------------------------------------------------------------------- the base


class _TrainingForward(nn.Module):
    """Adapter for :func:`count_macs`: one training forward pass of a task (every network, gate,
    projection and adapter; the losses have no multiply-accumulates worth counting)."""

    def __init__(self, task: Distiller) -> None:
        super().__init__()
        self.task = task

    def forward(self, images: Tensor) -> Tensor:
        labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        indices = torch.arange(images.shape[0], device=images.device)
        return self.task(images, labels, indices)[0]


class OnlineDistiller(Distiller):
    """Base of the online methods: several networks trained from scratch together, one deployed.

    Subclasses implement :meth:`heads` (logits of every trained network by name, plus
    ``ensemble``: the method's own ensemble of them), :meth:`candidates` (the heads that
    may be deployed) and :meth:`extract` (one of them as a plain zoo network). The
    validation pass logs every head (``val_<name>/top1``); ``model`` is the network
    currently chosen for deployment (the first candidate until :meth:`finalize` runs).
    """

    def __init__(self, student: nn.Module, cfg: BaseModel, ctx: MethodContext) -> None:
        super().__init__(student)
        self.cfg = cfg
        self.ctx = ctx
        self.deployed_name: str | None = None

    # -- what each method provides -------------------------------------------
    def heads(self, images: Tensor) -> dict[str, Tensor]:
        """Logits of every trained network, by name, and of their ``ensemble``."""
        raise NotImplementedError

    def candidates(self) -> list[str]:
        """Heads that may be deployed: networks of the student's architecture, in order of preference on ties."""
        raise NotImplementedError

    def extract(self, name: str) -> nn.Module:
        """Head ``name`` as one plain zoo network of the student's architecture."""
        raise NotImplementedError

    # -- shared behaviour ----------------------------------------------------
    @property
    def deployed(self) -> str:
        """The head that is (or, before :meth:`finalize`, would be) deployed."""
        return self.deployed_name or self.candidates()[0]

    def ramp(self) -> float:
        """Weight of the ramped terms in the current epoch (methods with ``rampup_epochs``)."""
        return sigmoid_rampup(self.epoch, ramp_length(getattr(self.cfg, "rampup_epochs", 0), self.num_epochs))

    def eval_logits(self, images: Tensor) -> dict[str, Tensor]:
        heads = self.heads(images)
        return {"model": heads[self.deployed], **heads}

    def ensemble_logits(self, images: Tensor) -> Tensor:
        """Logits of the online ensemble (the network that is not deployed)."""
        return self.heads(images)["ensemble"]

    def deployable(self) -> nn.Module:
        return self.extract(self.deployed)

    def finalize(self, history: list[dict[str, float]]) -> dict[str, Any]:
        """Deploy the candidate with the best validation top-1 of the last epoch (ties: the first).

        The last epoch is used because its weights are the ones deployed. Returns the
        facts for train.json: the choice, every head's validation top-1, the ensemble's,
        and parameters/MACs of what was trained vs what is deployed.
        """
        last = history[-1] if history else {}
        scores = {n: last[f"val_{n}/top1"] for n in self.candidates() if f"val_{n}/top1" in last}
        self.deployed_name = max(scores, key=lambda n: scores[n]) if scores else self.candidates()[0]
        heads = {k[len("val_"):-len("/top1")]: v for k, v in last.items() if k.startswith("val_") and k.endswith("/top1")}
        return {
            "deployed": self.deployed_name,
            "selected_by": "best last-epoch validation top-1 among " + ", ".join(self.candidates()),
            "val_top1": heads,
            "ensemble_val_top1": heads.get("ensemble"),
            **self.costs(),
        }

    def costs(self) -> dict[str, int]:
        """Parameters and MACs (batch 1) of everything trained vs the deployed network.

        ``trained_macs`` is one training forward pass through every network, gate,
        projection and adapter (backward not included).
        """
        ctx = self.ctx
        counter = _TrainingForward(self)
        counter.train(self.training)  # count_macs restores this mode, so the task keeps its own
        deployed = self.deployable()
        return {
            "trained_params": count_parameters(self),
            "trained_macs": count_macs(counter, ctx.in_channels, ctx.image_size),
            "deployed_params": count_parameters(deployed),
            "deployed_macs": count_macs(deployed, ctx.in_channels, ctx.image_size),
        }


# ----------------------------------------------------------------------------- shared low layers + branches


class Trunk(nn.Module):
    """Shared low layers: a StagedNet's stem and first ``split`` stages, under the same attribute names."""

    def __init__(self, net: StagedNet, split: int) -> None:
        super().__init__()
        self.stem = net.stem
        self.stages = nn.ModuleList(list(net.stages)[:split])

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x, _ = stage(x)
        return x


class BranchHead(nn.Module):
    """A StagedNet's layers from stage ``split`` on (stages, neck, pool, pre_logits, dropout, classifier)."""

    def __init__(self, net: StagedNet, split: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(list(net.stages)[split:])
        self.neck = net.neck
        self.pool = net.pool
        self.pre_logits = net.pre_logits
        self.head_drop = net.head_drop
        self.classifier = net.classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(embedding, logits)`` from the shared features, exactly as StagedNet's forward would."""
        for stage in self.stages:
            x, _ = stage(x)
        emb = self.pre_logits(torch.flatten(self.pool(self.neck(x)), 1))
        return emb, self.classifier(self.head_drop(emb))


class MultiBranchNet(nn.Module):
    """Shared low layers and ``len(nets)`` branches: the network ONE (and OKDDip) trains.

    The trunk comes from ``nets[0]`` (its stem and first ``split`` stages); branch ``i``
    is ``nets[i]``'s layers from stage ``split`` on. Passing freshly built zoo networks
    gives every branch the family's own, independent initialisation (the ONE reference
    builds each ``layer3_i`` separately); the low layers of ``nets[1:]`` are dropped.
    """

    def __init__(self, nets: Sequence[StagedNet], split: int) -> None:
        super().__init__()
        self.split = split
        self.trunk = Trunk(nets[0], split)
        self.branches = nn.ModuleList(BranchHead(n, split) for n in nets)

    def forward(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Shared features and every branch's ``(embedding, logits)``."""
        shared = self.trunk(x)
        return shared, [branch(shared) for branch in self.branches]

    def branch_state_dict(self, index: int) -> dict[str, Tensor]:
        """State dict of the plain StagedNet made of the trunk and branch ``index``.

        Trunk keys are already StagedNet keys (``stem.*``, ``stages.<j>.*`` for ``j < split``);
        branch keys only shift their stage index (``stages.<j>`` -> ``stages.<split + j>``).
        """
        out = dict(self.trunk.state_dict())
        for key, value in self.branches[index].state_dict().items():
            if key.startswith("stages."):
                j, rest = key[len("stages."):].split(".", 1)
                key = f"stages.{self.split + int(j)}.{rest}"
            out[key] = value
        return out

    def extract(self, index: int, ctx: MethodContext) -> StagedNet:
        """Branch ``index`` with the shared layers as a new plain StagedNet of ``ctx.student_arch``.

        The weights are copied (strict load: every key of the zoo network is covered),
        so the result equals that branch's path through the multi-branch network.
        """
        net = build_like(ctx)
        net.load_state_dict(self.branch_state_dict(index), strict=True)
        ref = next(self.parameters())
        return net.to(device=ref.device, dtype=ref.dtype)


def resolve_split(method: str, arch: str, net: nn.Module, shared_stages: int | None) -> int:
    """Number of shared stages (null: all but the last), checked against the architecture."""
    if not isinstance(net, StagedNet):
        raise MethodSetupError(
            f"{method}: {arch} cannot be split into shared low layers and branches: {method} needs a registry model "
            "assembled as stem + stages (`kdpipe models`), and a timm model runs as one network; "
            "dml and ekd train whole networks and take timm models"
        )
    n = len(net.stages)
    split = n - 1 if shared_stages is None else shared_stages
    if not 0 <= split < n:
        raise MethodSetupError(
            f"{method}: shared_stages={shared_stages} leaves no stage for the branches of {arch}, "
            f"which has {n} stages; allowed: 0..{n - 1} (or null for all but the last)"
        )
    return split


@torch.no_grad()
def probe_channels(module: nn.Module, ctx: MethodContext) -> int:
    """Channels of ``module``'s output on this run's input shape (a zero batch in eval mode)."""
    was_training = module.training
    module.eval()
    try:
        out = module(torch.zeros(2, ctx.in_channels, ctx.image_size, ctx.image_size))
    finally:
        module.train(was_training)
    return int(out.shape[1])


# ----------------------------------------------------------------------------- the ensemble file


def save_ensemble(path: str | Path, task: OnlineDistiller, meta: dict[str, Any] | None = None) -> Path:
    """Write every trained network of an online run with what is needed to rebuild it."""
    ctx = task.ctx
    payload = {
        "format": ENSEMBLE_FORMAT,
        "method": task.name,
        "method_params": task.cfg.model_dump(mode="json"),
        "context": {"student_arch": ctx.student_arch, "num_classes": int(ctx.num_classes),
                    "in_channels": int(ctx.in_channels), "image_size": int(ctx.image_size),
                    "num_train": int(ctx.num_train), "epochs": int(ctx.epochs), "teacher_arch": ctx.teacher_arch},
        "deployed": task.deployed,
        "state_dict": {k: v.detach().cpu() for k, v in task.trainable_state_dict().items()},
        "meta": dict(meta or {}),
    }
    return save_torch(payload, path)


def load_ensemble(path: str | Path) -> OnlineDistiller:
    """Rebuild an online run's task from its ensemble file (weights_only load), in eval mode."""
    from pipeline.distill.registry import load_methods

    obj = load_torch(path, ENSEMBLE_FORMAT)
    try:
        spec = load_methods()[str(obj["method"])]
        cfg = spec.params.model_validate(obj["method_params"])
        ctx = MethodContext(**obj["context"])
    except (KeyError, TypeError, ValidationError) as err:
        raise CheckpointError(f"{path} does not describe an online run this version can rebuild ({err})") from None
    if spec.offline:
        raise CheckpointError(f"{path} names method {spec.name!r}, which is not an online method")
    task = spec.cls(build_like(ctx), cfg, ctx)
    assert isinstance(task, OnlineDistiller)
    try:
        task.load_trainable_state_dict(obj["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit method {spec.name!r} on {ctx.student_arch}: {err}") from None
    task.deployed_name = str(obj["deployed"])
    return task.eval()


@torch.no_grad()
def ensemble_metrics(task: OnlineDistiller, dataset: Dataset, deployed_logits: Tensor, batch_size: int) -> dict[str, Any]:
    """Test scores of the online ensemble and of every trained network, and the training cost.

    ``ensemble_agreement`` is the share (%) of images where the deployed network predicts
    what the ensemble predicts; the pipeline's teacher plays no part in an online run.
    """
    logits, labels = predict(task.heads, dataset, batch_size)
    ens = logits.pop("ensemble")
    costs = task.costs()
    return {
        "ensemble_top1": round(100.0 * topk_accuracy(ens, labels, 1), 6),
        "ensemble_nll": round(F.cross_entropy(ens.double(), labels.long()).item(), 6),
        "ensemble_agreement": round(100.0 * (deployed_logits.argmax(1) == ens.argmax(1)).float().mean().item(), 6),
        "network_top1": {name: round(100.0 * topk_accuracy(lg, labels, 1), 6) for name, lg in logits.items()},
        "trained_params": costs["trained_params"],
        "trained_macs": costs["trained_macs"],
    }
