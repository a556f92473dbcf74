"""DVC stage `bundle`: one edge bundle folder (+ .tar.gz) per deployable model."""

from pipeline.deploy.bundle import bundle_all
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("bundle", bundle_all)
