"""DVC stage `train_teacher`: train the teacher, keeping checkpoints along its route."""

from pipeline.runs import RunId, train
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("train_teacher", lambda p: train(p, RunId("teacher")))
