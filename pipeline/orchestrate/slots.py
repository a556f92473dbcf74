"""Device slots: what each concurrently running stage may use.

One GPU per slot (``CUDA_VISIBLE_DEVICES``) where GPUs exist; else a share of the CPU
cores. On CPU the thread count of a stage is part of its result (CPU kernels sum in
an order that depends on it), so params' ``cpu_threads`` fixes it for every stage and
the slot only decides how many stages run at once; ``cpu_threads: null`` gives each
slot an equal share of the cores instead (faster alone, but outs then depend on
``--jobs``).
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.threads import THREAD_VARS


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else those ``nvidia-smi`` lists (no torch import)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Slot:
    """One place a stage runs: a GPU (or none) and a CPU thread count."""

    index: int
    gpu: str | None
    threads: int

    def env(self) -> dict[str, str]:
        """The environment variables that confine a stage process to this slot."""
        env = {var: str(self.threads) for var in THREAD_VARS}
        env["CUDA_VISIBLE_DEVICES"] = self.gpu if self.gpu is not None else ""
        env["KDPIPE_SLOT"] = str(self.index)
        return env


@dataclass(frozen=True)
class SlotPlan:
    """How many stages run at once and what each gets."""

    jobs: int
    gpus: tuple[str, ...]
    threads: int

    def slot(self, index: int) -> Slot:
        """Slot ``index`` (0 <= index < jobs): GPU ``index mod len(gpus)``, when there are GPUs."""
        gpu = self.gpus[index % len(self.gpus)] if self.gpus else None
        return Slot(index, gpu, self.threads)

    def describe(self) -> str:
        """One line for the run's log."""
        where = f"GPU {', '.join(self.gpus)}" if self.gpus else f"{cpu_cores()} CPU cores"
        return f"{self.jobs} stage(s) at a time on {where}, {self.threads} CPU thread(s) each"


def parse_jobs(value: str | int) -> int | str:
    """``--jobs``: a positive integer or ``auto``; ValueError naming the value otherwise."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        n = int(value)
        if n >= 1:
            return n
    elif isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    raise ValueError(f"--jobs {value!r}: expected a positive integer or 'auto'")


def plan_slots(jobs: int | str, cpu_threads: int | None) -> SlotPlan:
    """The slots for ``jobs`` (an int or "auto") with params' ``cpu_threads`` (None: share the cores).

    ``auto``: one stage per GPU where there are GPUs; on CPU one stage per ``cpu_threads``
    cores (``benchmarks/parallel_repro.py`` measures why: small CPU stages gain more from
    running side by side than from more threads each).
    """
    gpus = tuple(visible_gpus())
    cores = cpu_cores()
    n = parse_jobs(jobs)
    if n == "auto":
        n = len(gpus) if gpus else max(1, cores // (cpu_threads or 1))
    threads = cpu_threads if cpu_threads else max(1, cores // int(n))
    return SlotPlan(int(n), gpus, threads)


_POOLS: dict[SlotPlan, queue.SimpleQueue[int]] = {}
_POOLS_LOCK = threading.Lock()


def _worker_index(plan: SlotPlan) -> int | None:
    """Inside a Dask worker named by an integer (LocalCluster's are 0..N-1): that number, for its GPU."""
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        name = get_worker().name
    except ValueError:  # not in a worker
        return None
    return int(name) % max(1, plan.jobs) if str(name).isdigit() else None


@contextmanager
def claim(plan: SlotPlan) -> Iterator[Slot]:
    """A free slot of ``plan`` for the duration of one stage (a Dask worker uses the one its name gives)."""
    fixed = _worker_index(plan)
    if fixed is not None:
        yield plan.slot(fixed)
        return
    with _POOLS_LOCK:
        pool = _POOLS.get(plan)
        if pool is None:
            pool = _POOLS[plan] = queue.SimpleQueue()
            for i in range(plan.jobs):
                pool.put(i)
    index = pool.get()
    try:
        yield plan.slot(index)
    finally:
        pool.put(index)
