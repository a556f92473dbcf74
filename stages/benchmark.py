"""DVC stage `benchmark`: latency, throughput and memory of every model x variant x device profile."""

from pipeline.deploy.benchmark import benchmark_all
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("benchmark", benchmark_all)
