"""Does online distillation beat the student trained alone? Mean and spread over several seeds.

For each configured student, once per seed, in a scratch folder, with the pipeline's own
train/evaluate code (the calls the DVC stages make): the student alone (baseline), each
online method (its deployed network, and its ensemble, which is not deployed) and, for
reference, offline KD from the pipeline's teacher. Prints test top-1 as mean +- std, the
gain of every deployed network over the student alone, and what each online run trains
vs what it deploys (parameters, MACs at batch 1).

    python benchmarks/online_vs_alone.py                          # params.yaml, seeds 0 1 2, all online methods
    python benchmarks/online_vs_alone.py --methods dml one --epochs 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.params import ONLINE_METHODS, load_params  # noqa: E402
from pipeline.runs import RunId, evaluate, train  # noqa: E402


def _fmt(vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):6.2f} +- {sd:4.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(ONLINE_METHODS), choices=ONLINE_METHODS,
                    help="online methods to compare (default: all, whatever online.methods says)")
    ap.add_argument("--students", nargs="+", help="students to run (default: the params file's students)")
    ap.add_argument("--epochs", type=int, help="override train.epochs of the students' runs (the teacher keeps its own)")
    ap.add_argument("--no-kd", action="store_true", help="skip the teacher and offline KD reference")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny nets run fastest on 1)")
    ap.add_argument("--json", help="also write the per-seed results to this file")
    args = ap.parse_args()
    os.environ.setdefault("KDPIPE_PROGRESS", "off")
    torch.set_num_threads(args.threads)
    base = load_params(args.params)
    if args.epochs is not None:
        base = base.model_copy(update={"train": base.train.model_copy(update={"epochs": args.epochs})})
    students = args.students or list(base.students)
    for s in students:
        base.check_student(s)

    top1: dict[str, list[float]] = {}
    costs: dict[str, dict[str, int]] = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        params = base.model_copy(update={"seed": seed})
        with tempfile.TemporaryDirectory(prefix=f"onlinebench-{seed}-") as tmp:
            root = Path(tmp)
            plan = [] if args.no_kd else [RunId("teacher")]
            for s in students:
                plan.append(RunId("baseline", student=s))
                if not args.no_kd:
                    plan.append(RunId("distill", student=s, method="kd"))
                plan += [RunId("online", student=s, method=m) for m in args.methods]
            for run in plan:
                train(params, run, root)
                if run.role in ("baseline", "distill") and args.no_kd:
                    m = _score_without_teacher(params, run, root)
                else:
                    m = evaluate(params, run, root)
                top1.setdefault(run.key, []).append(m["top1"])
                line = f"seed {seed} {run.key:24s} top1 {m['top1']:6.2f}"
                if run.role == "online":
                    top1.setdefault(f"{run.key} (ensemble)", []).append(m["ensemble_top1"])
                    costs[run.key] = {"trained_params": m["trained_params"], "deployed_params": m["params"],
                                      "trained_macs": m["trained_macs"], "deployed_macs": m["macs"]}
                    line += f"  ensemble {m['ensemble_top1']:6.2f}"
                print(f"{line}  ({time.perf_counter() - t0:.0f}s)", flush=True)

    epochs = {s: params.student_train(s).epochs for s in students}
    print(f"\ntest top-1 (%), mean +- std over {len(args.seeds)} seeds {args.seeds}; student epochs {epochs}")
    for s in students:
        alone = statistics.mean(top1[f"baseline/{s}"])
        print(f"\n{s}")
        print(f"  {'alone (baseline)':28s} {_fmt(top1[f'baseline/{s}'])}")
        if not args.no_kd:
            kd = top1[f"kd/{s}"]
            print(f"  {'offline KD (' + base.teacher.model + ')':28s} {_fmt(kd)}  {statistics.mean(kd) - alone:+6.2f}")
        for m in args.methods:
            key = f"{m}/{s}"
            d = statistics.mean(top1[key]) - alone
            c = costs[key]
            print(f"  {m + ' deployed':28s} {_fmt(top1[key])}  {d:+6.2f} ({'better' if d > 0 else 'NOT better'} than alone)"
                  f"  trains {c['trained_params'] / c['deployed_params']:.1f}x params,"
                  f" {c['trained_macs'] / c['deployed_macs']:.1f}x MACs of what it deploys")
            ens = top1[f"{key} (ensemble)"]
            print(f"  {m + ' ensemble':28s} {_fmt(ens)}  {statistics.mean(ens) - alone:+6.2f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"top1": top1, "costs": costs, "seeds": args.seeds,
                                               "epochs": epochs}, indent=2))
    return 0


def _score_without_teacher(params, run: RunId, root: Path) -> dict[str, float]:
    """Test top-1 of a baseline when no teacher was trained (``--no-kd``): evaluate() would need one."""
    from pipeline.data import build_data
    from pipeline.engine.checkpoint import load_model_file
    from pipeline.engine.evaluation import predict, topk_accuracy

    data = build_data(params.data, params.seed)
    model, _ = load_model_file(run.out_dir(root) / "model.pt")
    logits, labels = predict(model, data.test, params.evaluate.batch_size)
    return {"top1": 100.0 * topk_accuracy(logits["model"], labels, 1)}


if __name__ == "__main__":
    sys.exit(main())
