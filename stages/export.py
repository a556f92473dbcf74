"""DVC stage `export`: every trained model to ONNX (dynamo exporter), parity-checked on the test split."""

from pipeline.deploy.export import export_all
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("export", export_all)
