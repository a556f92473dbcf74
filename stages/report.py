"""DVC stage `report`: results table (JSON, markdown), Pareto plot and the best model per latency budget."""

from pipeline.report.results import report_all
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("report", report_all)
