"""DVC stage `bundle`: one edge bundle folder (+ .tar.gz) per deployable model."""

from pipeline.deploy.bundle import bundle_all
from stages._deploy import run_deploy_stage

if __name__ == "__main__":
    run_deploy_stage("bundle", bundle_all)
