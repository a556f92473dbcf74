"""CPU threads of a stage process: params' ``cpu_threads``, the same for every stage.

On CPU the thread count is part of a run's result: torch's kernels split sums over
threads, so a teacher trained with 1 thread and with 2 differs in the last bits
(and so in every hash after it). Fixing it in params makes what a stage writes
independent of how many stages run beside it.
"""

from __future__ import annotations

import os
import sys

#: Environment variables that carry a CPU thread count to torch, OpenMP, MKL and OpenBLAS.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def apply_cpu_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op CPU threads in this process and its children (None: leave the defaults)."""
    if not threads:
        return
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:  # already imported: the variables came too late for it
        torch.set_num_threads(threads)
