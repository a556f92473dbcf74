"""DVC stage `evaluate_*`: score one trained model on the test split (metrics and plot data)."""

import argparse

from pipeline.runs import RunId, evaluate
from stages._common import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--role", choices=["teacher", "baseline", "distill", "online"], required=True)
    ap.add_argument("--student")
    ap.add_argument("--method")
    args = ap.parse_args()
    run_stage("evaluate", lambda p: evaluate(p, RunId(args.role, student=args.student, method=args.method)))
