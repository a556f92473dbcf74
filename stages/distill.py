"""DVC stage `distill@<student>-<method>`: a student trained by a distillation method."""

import argparse

from pipeline.runs import RunId, train
from stages._common import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--student", required=True)
    ap.add_argument("--method", required=True)
    args = ap.parse_args()
    run_stage("distill", lambda p: train(p, RunId("distill", student=p.check_student(args.student), method=args.method)))
