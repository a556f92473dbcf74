"""Orchestration of the DVC pipeline: the flow lock, the stage DAG, running and recording stages,
device slots, params overrides and experiments.

Modules import from lower layers only (DVC, config); nothing here imports torch or
Prefect except :mod:`pipeline.orchestrate.runners` (Prefect/Dask task runners).
"""
