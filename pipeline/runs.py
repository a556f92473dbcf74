"""Runs of the pipeline: what the stages call to train and evaluate one model.

Layout of what a run writes (all DVC outs, each written atomically):

    runs/<run>/                   model.pt, train.json (+ route/epoch_XXXX.pt for the teacher)
    live/<run>/                   DVCLive training curves
    metrics/<run>.json            test scores (DVC metrics)
    plots/confusion/<run>.json    one {actual, predicted} row per test image (DVC confusion plot)
    plots/per_class/<run>.json    top-1 per class (DVC bar plot)

where <run> is ``teacher``, ``baseline/<student>`` or ``<method>/<student>``.

Resume state lives in ``.kdpipe/state/<run id>/`` (ignored by git and DVC), kept after the run until
DVC has recorded its outs (:mod:`pipeline.run_state`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from pipeline.config.base import ConfigError
from pipeline.config.training import Pretrained, TrainConfig
from pipeline.data import DataSplits, build_data
from pipeline.distill import MethodContext, Vanilla, build_method
from pipeline.distill.online.common import OnlineDistiller, ensemble_metrics, load_ensemble, save_ensemble
from pipeline.engine import distributed
from pipeline.engine.atomic import atomic_dir, atomic_write_json, file_sha256, sha256_json
from pipeline.engine.checkpoint import load_model_file, save_model_file
from pipeline.engine.device import pick_device
from pipeline.engine.evaluation import classification_metrics, predict
from pipeline.engine.loop import RunSpec, fit
from pipeline.engine.optim import Finetune
from pipeline.models import build, count_parameters
from pipeline.models.complexity import count_macs
from pipeline.params import ONLINE_METHODS, Params
from pipeline.provenance import device_label
from pipeline.provenance import provenance as build_provenance
from pipeline.run_id import RunId
from pipeline.run_state import STATE_ROOT, clear_finished, mark_finished


def provenance(params_sha256: str, root: Path, *, git: bool = True, device: str = "cpu") -> dict[str, Any]:
    """What produced a run's outputs (:mod:`pipeline.provenance`); ``git=False`` for files compared by bytes."""
    return build_provenance(params_sha256, device=device, git=git, root=root)


def _plan(params: Params, run: RunId, root: Path) -> tuple[str, TrainConfig, dict[str, Any]]:
    """Architecture, recipe and the fingerprint inputs of a run."""
    if run.role == "teacher":
        arch, cfg = params.teacher.model, params.teacher_train()
        extra: dict[str, Any] = {"weights": params.teacher.weights, "route_every": params.teacher.route_every}
    else:
        arch, cfg = run.arch, params.student_train(run.arch)
        extra = {}
        if run.role == "distill":
            extra["method"] = run.method
            extra["method_params"] = getattr(params.distill, str(run.method)).model_dump(mode="json")
            extra["teacher_sha256"] = file_sha256(RunId("teacher").out_dir(root) / "model.pt")
        if run.role == "online":
            extra["method"] = run.method
            extra["method_params"] = online_method_params(params, str(run.method)).model_dump(mode="json")
            extra["teacher_arch"] = params.teacher.model  # EKD's evolving teacher defaults to it
    section = pretrained_section(params, run)
    weights = weights_file(section, root)
    if weights is not None:  # the file's bytes, not only its path, decide what a run trains
        extra["pretrained"] = {"weights": section.weights, "sha256": file_sha256(weights) if weights.is_file() else None,
                               "backbone_lr_scale": section.backbone_lr_scale, "freeze_epochs": section.freeze_epochs}
    fp = {"run": run.key, "arch": arch, "seed": params.seed, "data": params.data.model_dump(mode="json"),
          "train": cfg.model_dump(mode="json"), **extra}
    return arch, cfg, fp


def pretrained_section(params: Params, run: RunId) -> Pretrained:
    """The params section holding a run's pretrained weights: the teacher's, or its student's."""
    return params.teacher if run.role == "teacher" else params.students[params.check_student(run.arch)]


def weights_file(section: Pretrained, root: Path) -> Path | None:
    """A section's weights file, a relative path taken from the workspace root (None without one)."""
    if section.weights is None:
        return None
    path = Path(section.weights)
    return path if path.is_absolute() else root / path


def finetune_of(model: torch.nn.Module, section: Pretrained) -> Finetune | None:
    """How ``model``'s pretrained parameters train (None without a weights file)."""
    if section.weights is None:
        return None
    keys = getattr(model, "pretrained_keys", frozenset())
    return Finetune(pretrained=tuple(p for n, p in model.named_parameters() if n in keys),
                    lr_scale=section.backbone_lr_scale, freeze_epochs=section.freeze_epochs)


def online_method_params(params: Params, method: str) -> BaseModel:
    """The ``online.<method>`` params section; a ConfigError for a method that is not online."""
    if method not in ONLINE_METHODS:
        raise ConfigError(f"{method!r} is not an online method; allowed: {', '.join(ONLINE_METHODS)}")
    return getattr(params.online, method)


def load_teacher(root: Path, data: DataSplits) -> torch.nn.Module:
    """The trained teacher of this workspace (``runs/teacher/model.pt``)."""
    model, _ = load_model_file(RunId("teacher").out_dir(root) / "model.pt", expect_classes=data.num_classes)
    return model


def train(params: Params, run: RunId, root: Path = Path(".")) -> Path:
    """Train one run and write its out folder atomically; returns the folder.

    Under torchrun every rank trains (data-parallel, see :func:`~pipeline.engine.loop.fit`)
    and rank 0 alone writes the outs; every rank returns once they are written.
    """
    data = build_data(params.data, params.seed)
    arch, cfg, fp = _plan(params, run, root)
    section = pretrained_section(params, run)
    torch.manual_seed(params.seed)
    weights = weights_file(section, root)
    model = build(arch, num_classes=data.num_classes, in_channels=data.in_channels,
                  image_size=data.image_size, weights=None if weights is None else str(weights))
    if run.role == "distill":
        teacher = load_teacher(root, data)
        method_params = getattr(params.distill, str(run.method))
        ctx = MethodContext(
            student_arch=arch, num_classes=data.num_classes, in_channels=data.in_channels,
            image_size=data.image_size, num_train=len(data.train), epochs=cfg.epochs,
            teacher_arch=params.teacher.model, teacher_dir=RunId("teacher").out_dir(root),
        )
        task = build_method(str(run.method), model, teacher, method_params, ctx)
    elif run.role == "online":
        ctx = MethodContext(
            student_arch=arch, num_classes=data.num_classes, in_channels=data.in_channels,
            image_size=data.image_size, num_train=len(data.train), epochs=cfg.epochs, teacher_arch=params.teacher.model,
        )
        task = build_method(str(run.method), model, None, online_method_params(params, str(run.method)), ctx)
    else:
        task = Vanilla(model)
    state_dir = root / STATE_ROOT / run.key
    fingerprint = sha256_json(fp)
    if distributed.is_main():
        clear_finished(state_dir)  # its outs are about to be replaced: not prunable until written again
    workers = params.data.num_workers
    for phase in task.phases():
        phase_cfg = cfg.model_copy(update={"epochs": phase.epochs})
        if phase.lr is not None:
            phase_cfg = phase_cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"lr": phase.lr})})
        phase_spec = RunSpec(label=f"{run.key}:{phase.name}", state_dir=state_dir / "phases" / phase.name,
                             fingerprint=sha256_json({**fp, "phase": phase.name}))
        fit(phase.task, data.train, data.val, phase_cfg, params.seed, phase_spec, num_workers=workers)
    spec = RunSpec(
        label=run.key, state_dir=state_dir / "main", fingerprint=fingerprint,
        route_every=params.teacher.route_every if run.role == "teacher" else None,
    )
    result = fit(task, data.train, data.val, cfg, params.seed, spec, num_workers=workers,
                 finetune=finetune_of(model, section))
    facts = task.finalize(result.history)
    out = run.out_dir(root)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 writes the outs
        return out
    deploy = task.deployable().cpu().eval()
    meta = {"role": run.role, "student": run.student, "method": run.method, "run": run.key,
            "class_names": list(data.class_names), "epochs": cfg.epochs,
            # counted here, where training already loaded what torch's flop counter needs (torch._dynamo, ~2 s
            # of import an evaluate stage would otherwise spend on this one number)
            "macs": count_macs(deploy, data.in_channels, data.image_size),
            **provenance(fingerprint, root, git=False, device=device_label(pick_device()))}  # model.pt: no git facts
    with atomic_dir(out) as tmp:
        save_model_file(tmp / "model.pt", deploy, arch, data.num_classes, data.in_channels, data.image_size, meta)
        if (spec.state_dir / "route").is_dir():
            shutil.copytree(spec.state_dir / "route", tmp / "route")
        # no resume record here: a resumed run's outs must be byte-identical to an uninterrupted run's
        # (the stage log says "resuming after epoch N")
        atomic_write_json(tmp / "train.json", {"final": result.final, "epochs": len(result.history),
                                               "meta": meta, "method_facts": facts,  # no wall-clock: same params, same bytes
                                               "provenance": provenance(fingerprint, root, device=meta["device"])})
        if isinstance(task, OnlineDistiller):  # every trained network, for the ensemble's test score
            save_ensemble(tmp / "ensemble.pt", task, meta)
    with atomic_dir(run.live_dir(root)) as tmp:
        shutil.copytree(spec.state_dir / "live", tmp, dirs_exist_ok=True)
    # kept until DVC has recorded these outs: a kill before that reruns the stage, which then trains nothing
    mark_finished(state_dir, [out, run.live_dir(root)], root)
    distributed.barrier()
    return out


def evaluate(params: Params, run: RunId, root: Path = Path(".")) -> dict[str, Any]:
    """Score a trained run on the test split and write its metrics and plot data atomically."""
    data = build_data(params.data, params.seed)
    model_path = run.out_dir(root) / "model.pt"
    model, info = load_model_file(model_path, expect_classes=data.num_classes)
    bs = params.evaluate.batch_size
    logits, labels = predict(model, data.test, bs)
    teacher_logits = None
    if run.role in ("baseline", "distill"):  # an online run has no teacher: it is compared with its ensemble
        teacher_logits = predict(load_teacher(root, data), data.test, bs)[0]["model"]
    m = classification_metrics(logits["model"], labels, data.num_classes, teacher_logits, params.evaluate.ece_bins)
    names = list(data.class_names)
    per_class = [{"class": names[i], "top1": v} for i, v in enumerate(m.pop("per_class_top1"))]
    m.pop("confusion")
    pred = logits["model"].argmax(1).tolist()
    confusion_rows = [{"actual": names[a], "predicted": names[p]} for a, p in zip(labels.tolist(), pred, strict=True)]
    metrics = {
        **{k: round(float(v), 6) for k, v in m.items()},
        "params": count_parameters(model),
        "macs": info["macs"] if "macs" in info else count_macs(model, data.in_channels, data.image_size),
        "checkpoint_bytes": model_path.stat().st_size,
        "test_samples": len(labels),
    }
    if run.role == "online":
        ensemble = load_ensemble(run.out_dir(root) / "ensemble.pt")
        metrics.update(ensemble_metrics(ensemble, data.test, logits["model"], bs))
    dumped = params.model_dump(mode="json")
    metrics["provenance"] = {**provenance(sha256_json({k: dumped[k] for k in ("seed", "data", "evaluate")}), root),
                             "train_params_sha256": info.get("params_sha256")}
    if not distributed.is_main():  # launched under torchrun: rank 0 alone writes
        return metrics
    atomic_write_json(run.plot_file(root, "confusion"), confusion_rows)
    atomic_write_json(run.plot_file(root, "per_class"), per_class)
    atomic_write_json(run.metrics_file(root), metrics)
    return metrics
