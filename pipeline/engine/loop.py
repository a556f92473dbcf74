"""The one training loop: every run (teacher, baseline, offline, online) goes through :func:`fit`.

A run keeps its working state in a *state folder* (resume checkpoint, route
checkpoints, DVCLive logs). The state is tagged with a fingerprint of everything
that defines the run; a rerun with the same fingerprint resumes from the last
finished epoch and ends bit-identical to an uninterrupted run, because each epoch's
randomness depends only on (seed, epoch). A different fingerprint starts afresh.

Under ``torchrun`` (several processes, see :mod:`pipeline.engine.distributed`) the same
loop runs data-parallel: each rank trains on its slice of every global batch through
``DistributedDataParallel``, the ranks agree on every metric and stop together on a
non-finite loss, and rank 0 alone touches the state folder (it reads the resume state
and hands it to the others, and writes checkpoints and DVCLive logs). A single process
runs exactly the code path it always did.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from pipeline.config.training import TrainConfig
from pipeline.engine import distributed
from pipeline.engine.atomic import atomic_write_json
from pipeline.engine.checkpoint import STATE_FORMAT, CheckpointError, load_torch, save_torch
from pipeline.engine.device import autocast, pick_device
from pipeline.engine.evaluation import predict, topk_accuracy
from pipeline.engine.optim import Finetune, build_optimizer, build_scheduler
from pipeline.engine.progress import Progress
from pipeline.engine.seeding import reseed_worker_for_rank, rng_state, seed_epoch, seed_everything, set_rng_state
from pipeline.engine.trainable import Trainable
from pipeline.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss became NaN/Inf; the run stopped and the last good checkpoint was kept."""


@dataclass
class RunSpec:
    """Identity and bookkeeping of one training run."""

    label: str
    state_dir: Path
    fingerprint: str
    route_every: int | None = None
    eval_batch_size: int = 256


@dataclass
class FitResult:
    """What a finished run hands back: per-epoch history and where it started from."""

    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def route_path(state_dir: Path, epoch: int) -> Path:
    """Where the route checkpoint after ``epoch`` finished epochs lives."""
    return state_dir / "route" / f"epoch_{epoch:04d}.pt"


def _prepare_state_dir(spec: RunSpec, progress: Progress) -> dict[str, Any] | None:
    """Return the resumable state if the folder holds one for this fingerprint, else reset it."""
    d = spec.state_dir
    fp_file = d / "fingerprint.json"
    last = d / "last.pt"
    if fp_file.is_file() and last.is_file():
        try:
            stored = json.loads(fp_file.read_text())["fingerprint"]
        except (ValueError, KeyError):
            stored = None
        if stored == spec.fingerprint:
            try:
                state = load_torch(last, STATE_FORMAT)
                if state.get("fingerprint") == spec.fingerprint:
                    return state
            except CheckpointError as err:
                progress.note(f"resume checkpoint unusable, starting afresh: {err}")
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    atomic_write_json(fp_file, {"fingerprint": spec.fingerprint})
    return None


class _Live:
    """DVCLive curves rebuilt from the checkpointed history on resume, so they match exactly."""

    def __init__(self, live_dir: Path, history: list[dict[str, float]]) -> None:
        from dvclive import Live

        if live_dir.exists():
            shutil.rmtree(live_dir)
        self.live = Live(dir=str(live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
        for rec in history:
            self.log(rec)

    def log(self, rec: dict[str, float]) -> None:
        for k, v in rec.items():
            if k != "epoch":
                self.live.log_metric(k, v, plot=True)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


def fit(
    task: Trainable,
    train_set: torch.utils.data.Dataset,
    val_set: torch.utils.data.Dataset,
    cfg: TrainConfig,
    seed: int,
    spec: RunSpec,
    num_workers: int = 0,
    device: torch.device | None = None,
    finetune: Finetune | None = None,
) -> FitResult:
    """Train ``task`` for ``cfg.epochs`` epochs, resuming from ``spec.state_dir`` when possible.

    ``finetune`` names the pretrained parameters, trained at a scaled lr and frozen
    for its first epochs (:class:`~pipeline.engine.optim.Finetune`).

    Launched by torchrun with several processes, the run is data-parallel (module
    docstring); ``cfg.batch_size`` is then the global batch, split over the ranks.
    """
    t_start = time.perf_counter()
    dist_on = distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    if dist_on:
        distributed.local_batch_size(cfg.batch_size, world)  # a clear error before any work
    progress = Progress(spec.label, cfg.epochs)
    device = device or pick_device()
    seed_everything(seed)
    task.to(device)
    if device.type == "cuda" and cfg.channels_last:
        task.to(memory_format=torch.channels_last)
    use_amp = cfg.amp and device.type == "cuda"

    optimizer = build_optimizer(task.trainable_parameters(), cfg, finetune)
    scheduler = build_scheduler(optimizer, cfg, finetune)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[dict[str, float]] = []
    start_epoch = 0

    state = _prepare_state_dir(spec, progress) if main else None
    if dist_on:  # rank 0 alone reads the state folder (it may be on rank 0's node only)
        state = distributed.broadcast_object(state)
    if state is not None:
        task.load_trainable_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        set_rng_state(state["rng"])
        done = ": every epoch was done, nothing left to train" if start_epoch >= cfg.epochs else ""
        progress.note(f"resuming after epoch {start_epoch} from {spec.state_dir / 'last.pt'}{done}")
    live = _Live(spec.state_dir / "live", history) if main else None

    forward: torch.nn.Module = task
    if dist_on:
        # Same starting point everywhere (weights, buffers, method state), then DDP over the trained parameters.
        distributed.broadcast_tensors(task.trainable_state_dict().values())
        forward = distributed.wrap(task, task.trainable_parameters(), device)

    n_train = len(train_set)
    drop_last = n_train % cfg.batch_size == 1  # a lone sample would break batch norm
    try:
        for epoch in range(start_epoch, cfg.epochs):
            gen = seed_epoch(seed, epoch, rank)
            task.train()
            task.on_epoch_start(epoch, cfg.epochs)
            summed = sorted(task.rank_summed_buffers()) if dist_on else []  # the same order on every rank
            buffers = dict(task.named_buffers()) if summed else {}
            at_start = [buffers[name].detach().clone() for name in summed]
            if dist_on:
                loader = DataLoader(
                    train_set, batch_sampler=distributed.ShardedBatches(n_train, cfg.batch_size, rank, world, gen),
                    generator=gen, num_workers=num_workers, pin_memory=device.type == "cuda",
                    worker_init_fn=functools.partial(reseed_worker_for_rank, rank) if num_workers else None,
                )
            else:
                loader = DataLoader(
                    train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                    num_workers=num_workers, drop_last=drop_last, pin_memory=device.type == "cuda",
                )
            sums: dict[str, float] = {}
            correct, seen = 0.0, 0
            for step, (images, labels, indices) in enumerate(progress.steps(loader, epoch, len(loader))):
                images = images.to(device, non_blocking=True)
                if device.type == "cuda" and cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                indices = indices.to(device, non_blocking=True)
                with autocast(device, use_amp):
                    logits, terms = forward(images, labels, indices)
                    loss = torch.stack([v.float() for v in terms.values()]).sum()
                finite = bool(torch.isfinite(loss))
                bad_ranks = distributed.flagged_ranks(not finite) if dist_on else ([] if finite else [0])
                if bad_ranks:  # every rank stops at the same step, before any gradient exchange
                    raise NonFiniteLossError(_non_finite_message(spec, epoch, step, loss, terms, bad_ranks, dist_on))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(list(task.trainable_parameters()), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                b = labels.shape[0]
                seen += b
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * b
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * b
                correct += float((logits.detach().argmax(1) == labels).sum())
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if dist_on:
                # Global means over every rank's samples; buffers that add up samples summed over the
                # ranks, the others (batch-norm statistics, method state) rank 0's for all, so
                # validation, checkpoints and the next epoch agree.
                totals = distributed.reduce_sums({**sums, "\0correct": correct, "\0seen": float(seen)})
                correct, seen = totals.pop("\0correct"), int(totals.pop("\0seen"))
                sums = totals
                distributed.sum_increments([buffers[name] for name in summed], at_start)
                distributed.broadcast_tensors(b for name, b in _named_buffers(task) if name not in summed)

            rec: dict[str, float] = {"epoch": epoch + 1, "lr": lr}
            rec.update({f"train/{k}": v / max(seen, 1) for k, v in sums.items()})
            rec["train/top1"] = 100.0 * correct / max(seen, 1)
            if dist_on:
                rec.update(_validate_sharded(task, val_set, spec.eval_batch_size, device, use_amp))
            else:
                rec.update(_validate(task, val_set, spec.eval_batch_size, device, use_amp))
            history.append(rec)

            if main:
                ckpt = {
                    "format": STATE_FORMAT, "fingerprint": spec.fingerprint, "epoch": epoch + 1,
                    "model": task.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "rng": rng_state(), "history": history,
                }
                if spec.route_every and ((epoch + 1) % spec.route_every == 0 or epoch + 1 == cfg.epochs):
                    save_torch({"format": "kdpipe-route/1", "epoch": epoch + 1,
                                "state_dict": {k: v.detach().cpu() for k, v in task.deployable().state_dict().items()},
                                "val_top1": rec.get("val/top1", math.nan)}, route_path(spec.state_dir, epoch + 1))
                save_torch(ckpt, spec.state_dir / "last.pt")
                assert live is not None
                live.log(rec)
            progress.epoch_done(epoch, {k: v for k, v in rec.items() if k in ("train/loss", "train/top1", "val/top1", "lr")})
    finally:
        if live is not None:
            live.close()
        del forward  # a DDP wrapper's gradient hooks must not outlive this run (phases share networks)
    return FitResult(history=history, resumed_from=start_epoch, seconds=time.perf_counter() - t_start)


def _named_buffers(task: Trainable) -> list[tuple[str, torch.Tensor]]:
    """The task's own buffers (trained networks and method state; frozen networks excluded)."""
    skip = task.frozen_prefixes()
    return [(name, b) for name, b in task.named_buffers() if not name.startswith(skip)]


def _non_finite_message(spec: RunSpec, epoch: int, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor],
                        bad_ranks: list[int], dist_on: bool) -> str:
    where = f"at epoch {epoch + 1}, step {step + 1}"
    keep = f"last good checkpoint kept at {spec.state_dir / 'last.pt'}"
    if not dist_on:
        bad = {k: float(v.detach()) for k, v in terms.items()}
        return f"[{spec.label}] loss became {loss.item()} {where} (terms {bad}); stopped, {keep}"
    if torch.isfinite(loss):
        return f"[{spec.label}] loss became non-finite on rank(s) {bad_ranks} {where}; every rank stopped, {keep}"
    bad = {k: float(v.detach()) for k, v in terms.items()}
    return (f"[{spec.label}] loss became {loss.item()} on rank(s) {bad_ranks} {where} (terms on rank "
            f"{distributed.rank()}: {bad}); every rank stopped, {keep}")


def _validate(task: Trainable, val_set, batch_size: int, device: torch.device, amp: bool) -> dict[str, float]:
    task.eval()
    logits, labels = predict(task.eval_logits, val_set, batch_size, device, amp)
    out: dict[str, float] = {}
    for name, lg in logits.items():
        prefix = "val" if name == "model" else f"val_{name}"
        out[f"{prefix}/top1"] = 100.0 * topk_accuracy(lg, labels, 1)
        out[f"{prefix}/nll"] = torch.nn.functional.cross_entropy(lg, labels.long()).item()
    return out


def _validate_sharded(task: Trainable, val_set, batch_size: int, device: torch.device, amp: bool) -> dict[str, float]:
    """:func:`_validate` under DDP: each rank scores a contiguous slice, the counts are summed over ranks."""
    task.eval()
    n, rank, world = len(val_set), distributed.rank(), distributed.world_size()
    lo, hi = n * rank // world, n * (rank + 1) // world
    sums: dict[str, float] = {}
    if hi > lo:
        logits, labels = predict(task.eval_logits, Subset(val_set, range(lo, hi)), batch_size, device, amp)
        for name, lg in logits.items():
            sums[f"{name}\0correct"] = float((lg.argmax(1) == labels).sum())
            sums[f"{name}\0nll"] = torch.nn.functional.cross_entropy(lg.double(), labels.long(), reduction="sum").item()
    totals = distributed.reduce_sums(sums)
    out: dict[str, float] = {}
    for key in totals:
        name, what = key.split("\0")
        if what != "correct":
            continue
        prefix = "val" if name == "model" else f"val_{name}"
        out[f"{prefix}/top1"] = 100.0 * totals[key] / n
        out[f"{prefix}/nll"] = totals[f"{name}\0nll"] / n
    return out
