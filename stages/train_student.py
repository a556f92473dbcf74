"""DVC stage `train_student@<student>`: a student trained alone on labels (the baseline)."""

import argparse

from pipeline.runs import RunId, train
from stages._common import run_stage

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--student", required=True)
    args = ap.parse_args()
    run_stage("train_student", lambda p: train(p, RunId("baseline", student=p.check_student(args.student))))
