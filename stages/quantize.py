"""DVC stage `quantize`: static INT8 (QDQ) and FP16 variants of every export, each scored with onnxruntime."""

from pipeline.deploy.quantize import quantize_all
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("quantize", quantize_all)
