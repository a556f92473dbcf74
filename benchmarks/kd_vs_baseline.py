"""Does distillation beat the student trained alone? Mean and spread over several seeds.

Runs the pipeline's own train/evaluate code (the same calls the DVC stages make) for the
teacher, each student alone and each student with every configured method, once per
seed, in a scratch folder, and prints test top-1 per model as mean +- std.

    python benchmarks/kd_vs_baseline.py                     # params.yaml, seeds 0 1 2
    python benchmarks/kd_vs_baseline.py --seeds 0 1 2 3 4 --params recipes/x.yaml
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

from pipeline.params import load_params  # noqa: E402
from pipeline.runs import RunId, evaluate, train  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", help="also write the per-seed results to this file")
    args = ap.parse_args()
    os.environ.setdefault("KDPIPE_PROGRESS", "off")
    base = load_params(args.params)
    results: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        params = base.model_copy(update={"seed": seed})
        with tempfile.TemporaryDirectory(prefix=f"kdbench-{seed}-") as tmp:
            root = Path(tmp)
            runs = [RunId("teacher")]
            for s in params.students:
                runs.append(RunId("baseline", student=s))
                runs += [RunId("distill", student=s, method=m) for m in params.distill.methods]
            for run in runs:
                train(params, run, root)
                top1 = evaluate(params, run, root)["top1"]
                results.setdefault(run.key, []).append(top1)
                print(f"seed {seed} {run.key:28s} top1 {top1:6.2f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"\n{'run':28s} {'mean':>7s} {'std':>6s}  per seed ({len(args.seeds)} seeds: {args.seeds})")
    for key, vals in results.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{key:28s} {statistics.mean(vals):7.2f} {sd:6.2f}  {[round(v, 2) for v in vals]}")
    for s in base.students:
        b = statistics.mean(results[f"baseline/{s}"])
        for m in base.distill.methods:
            d = statistics.mean(results[f"{m}/{s}"]) - b
            print(f"{m}/{s} vs baseline: {d:+.2f} points ({'better' if d > 0 else 'NOT better'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
