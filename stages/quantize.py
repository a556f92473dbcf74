"""DVC stage `quantize`: static INT8 (QDQ) and FP16 variants of every export, each scored with onnxruntime."""

from pipeline.deploy.quantize import quantize_all
from stages._deploy import run_deploy_stage

if __name__ == "__main__":
    run_deploy_stage("quantize", quantize_all)
