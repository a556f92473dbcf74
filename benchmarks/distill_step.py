"""Throughput of one training step for every distillation method, against its floor.

Prints images/s of the teacher's inference, of the student's plain training step
(forward, cross-entropy, backward, SGD step) and of each method's distillation step
(the same, through the method's ``Distiller``), measured in the same run with the
calls of all of them interleaved one by one (the median call is reported), so a busy
machine slows all of them alike. For every method it also prints

    ratio = step time / (student step time + teacher inference time)

the cost of distilling over its floor (each method is timed interleaved with its own
floor); the target for the logit methods (kd, dkd, rco, eskd) is <= 1.10. Methods with a preliminary phase report its step as
``<method>:<phase>`` too.

Examples::

    python benchmarks/distill_step.py                                  # embedded default pair (digits 8x8)
    python benchmarks/distill_step.py --teacher resnet32x4 --student resnet8x4 --image-size 32 \\
        --channels 3 --classes 100 --num-train 50000 --device cuda      # the CIFAR-100 pair on a GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.distill import Distiller, MethodContext, build_method  # noqa: E402
from pipeline.distill.registry import load_methods  # noqa: E402
from pipeline.engine.checkpoint import save_torch  # noqa: E402
from pipeline.engine.device import autocast  # noqa: E402
from pipeline.models import build  # noqa: E402
from pipeline.params import Params  # noqa: E402

LOGIT_METHODS = ("kd", "dkd", "rco", "eskd")
TARGET_RATIO = 1.10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round(jobs: dict[str, Callable[[], None]], steps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` calls of every job, the jobs taking turns call by call.

    Taking turns at the finest grain makes every job see the same background load,
    which matters on a shared machine; the synchronisation after each call is what the
    training loop does anyway (it reads every loss term back each step).
    """
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(steps):
        for name, fn in jobs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _train_step(task: torch.nn.Module, forward: Callable[[], torch.Tensor], params: list[torch.nn.Parameter],
                device: torch.device, amp: bool) -> Callable[[], None]:
    """One optimizer step as the training loop does it (zero_grad, AMP scaler, SGD)."""
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step() -> None:
        with autocast(device, amp):
            loss = forward()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def _route(tmp: Path, teacher: torch.nn.Module) -> Path:
    """A fake teacher folder whose route holds the teacher's weights at epochs 1..4 (for rco and eskd)."""
    state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    for e in range(1, 5):
        save_torch({"format": "kdpipe-route/1", "epoch": e, "state_dict": state}, tmp / "route" / f"epoch_{e:04d}.pt")
    return tmp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="tinynet_l")
    ap.add_argument("--student", default="tinynet_s")
    ap.add_argument("--image-size", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--num-train", type=int, default=1221, help="training-set size (CRD's memory bank)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of interleaved calls; the median call is reported")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic of the interleaved calls (min: the least disturbed call, for busy machines)")
    ap.add_argument("--methods", default="all", help="comma-separated method names, or all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (the loop uses AMP by default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    torch.manual_seed(0)
    specs = load_methods()
    methods = [m for m in specs if specs[m].offline] if args.methods == "all" else args.methods.split(",")
    defaults = Params().distill
    b, c, s = args.batch_size, args.channels, args.image_size

    def make(name: str) -> torch.nn.Module:
        m = build(name, args.classes, c, s).to(device)
        if device.type == "cuda":
            m = m.to(memory_format=torch.channels_last)
        return m

    teacher = make(args.teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.randn(b, c, s, s, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (b,), device=device)
    idx = torch.randint(0, args.num_train, (b,), device=device)

    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-bench-"))
    try:
        return _run(args, device, amp, methods, defaults, make, teacher, x, y, idx, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, device: torch.device, amp: bool, methods: list[str], defaults: Any,
         make: Callable[[str], torch.nn.Module], teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
         idx: torch.Tensor, tmp: Path) -> int:
    """Build every method against ``teacher``, time the steps and print the table."""
    b, c, s = args.batch_size, args.channels, args.image_size
    ctx = MethodContext(student_arch=args.student, num_classes=args.classes, in_channels=c, image_size=s,
                        num_train=args.num_train, epochs=240, teacher_arch=args.teacher, teacher_dir=_route(tmp, teacher))
    overrides = {"eskd": {"teacher_epoch": 1}}  # an early checkpoint: a network of its own, as in a real run

    def infer() -> None:
        with torch.no_grad(), autocast(device, amp):
            teacher(x)

    student = make(args.student).train()
    plain = _train_step(student, lambda: F.cross_entropy(student(x), y), list(student.parameters()), device, amp)
    floor_jobs: dict[str, Callable[[], None]] = {"teacher inference": infer, "student step": plain}
    groups: dict[str, dict[str, Callable[[], None]]] = {}  # method -> its steps (phases first, then the main one)
    for name in methods:
        cfg = getattr(defaults, name).model_copy(update=overrides.get(name, {}))
        task: Distiller = build_method(name, make(args.student), teacher, cfg, ctx).to(device)
        task.train()
        task.on_epoch_start(0, 240)
        steps: dict[str, Callable[[], None]] = {}
        for phase in task.phases():
            ptask = phase.task.to(device)
            ptask.train()
            steps[f"{name}:{phase.name}"] = _train_step(
                ptask, lambda t=ptask: torch.stack([v.float() for v in t(x, y, idx)[1].values()]).sum(),
                list(ptask.trainable_parameters()), device, amp)
        steps[name] = _train_step(
            task, lambda t=task: torch.stack([v.float() for v in t(x, y, idx)[1].values()]).sum(),
            list(task.trainable_parameters()), device, amp)
        groups[name] = steps

    # Each method is timed interleaved with its own floor (teacher inference and student step), so the
    # ratio compares calls that ran under the same load and the same cache state.
    pick = statistics.median if args.stat == "median" else min
    floor_times: dict[str, list[float]] = {k: [] for k in floor_jobs}
    result: dict[str, tuple[float, float | None]] = {}
    for steps in groups.values():
        jobs = {**floor_jobs, **steps}
        for fn in jobs.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for _ in range(args.rounds):
            for k, t in _round(jobs, args.steps, device).items():
                times[k].extend(t)
        floor = pick(times["student step"]) + pick(times["teacher inference"])
        for k in floor_jobs:
            floor_times[k].extend(times[k])
        for k in steps:
            result[k] = (pick(times[k]), pick(times[k]) / floor)
    rows_in = {k: (pick(v), None) for k, v in floor_times.items()} | result

    print(f"# {args.teacher} -> {args.student}, {c}x{s}x{s}, {args.classes} classes, batch {b}, device {device}"
          f"{' (AMP)' if amp else ''}, threads {torch.get_num_threads()}, {args.stat} of {args.rounds * args.steps} "
          "calls per job, each method interleaved with its floor")
    print(f"{'':24s} {'images/s':>10s} {'ms/step':>9s} {'ratio':>7s}")
    rows = []
    for k, (t, ratio) in rows_in.items():
        flag = ""
        if ratio is not None and k in LOGIT_METHODS:
            flag = "  ok" if ratio <= TARGET_RATIO else f"  > {TARGET_RATIO}"
        r = f"{ratio:7.3f}" if ratio is not None else f"{'':7s}"
        print(f"{k:24s} {b / t:10.1f} {1000 * t:9.3f} {r}{flag}")
        rows.append({"name": k, "images_per_s": b / t, "ms_per_step": 1000 * t, "ratio": ratio})
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
