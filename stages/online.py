"""DVC stage `online@<student>-<method>`: networks trained together from scratch by an online method; one is deployed."""

import argparse

from pipeline.runs import RunId, train
from stages._common import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--student", required=True)
    ap.add_argument("--method", required=True)
    args = ap.parse_args()
    run_stage("online", lambda p: train(p, RunId("online", student=p.check_student(args.student), method=args.method)))
