"""DVC stage `tensorrt`: TensorRT engines where tensorrt and a GPU exist; a "skipped" record with the reason elsewhere."""

from pipeline.deploy.tensorrt_build import build_all
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("tensorrt", build_all)
