"""Scoring a classifier: accuracy, calibration, agreement with a teacher, confusion matrix."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pipeline.engine.device import autocast


@torch.no_grad()
def predict(
    forward: Callable[[Tensor], dict[str, Tensor] | Tensor],
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | None = None,
    amp: bool = False,
) -> tuple[dict[str, Tensor], Tensor]:
    """Logits of one or several heads over a dataset, in dataset order, on the CPU in float32."""
    device = device or torch.device("cpu")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    outs: dict[str, list[Tensor]] = {}
    labels: list[Tensor] = []
    for images, target, _ in loader:
        with autocast(device, amp):
            res = forward(images.to(device, non_blocking=True))
        if isinstance(res, Tensor):
            res = {"model": res}
        for name, logits in res.items():
            outs.setdefault(name, []).append(logits.float().cpu())
        labels.append(torch.as_tensor(target))
    return {k: torch.cat(v) for k, v in outs.items()}, torch.cat(labels)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Share of samples whose label is among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): confidence-vs-accuracy gap averaged over equal-width confidence bins."""
    probs = logits.double().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.double().mean() * (conf[mask].mean() - correct[mask].mean()).abs()
    return ece.item()


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Counts ``[actual, predicted]``."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(
    logits: Tensor,
    labels: Tensor,
    num_classes: int,
    teacher_logits: Tensor | None = None,
    ece_bins: int = 15,
) -> dict[str, object]:
    """Every score a model gets: top-1/top-5 (%), NLL, ECE, teacher agreement (%), per-class accuracy."""
    pred = logits.argmax(dim=1)
    cm = confusion_matrix(pred, labels, num_classes)
    support = cm.sum(dim=1).clamp(min=1)
    out: dict[str, object] = {
        "top1": 100.0 * topk_accuracy(logits, labels, 1),
        "top5": 100.0 * topk_accuracy(logits, labels, 5),
        "nll": torch.nn.functional.cross_entropy(logits.double(), labels.long()).item(),
        "ece": expected_calibration_error(logits, labels, ece_bins),
        "per_class_top1": (100.0 * cm.diag().double() / support.double()).tolist(),
        "confusion": cm.tolist(),
    }
    if teacher_logits is not None:
        out["teacher_agreement"] = 100.0 * (pred == teacher_logits.argmax(dim=1)).float().mean().item()
    return out
