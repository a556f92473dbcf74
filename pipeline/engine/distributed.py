"""Several processes, one training run: torchrun detection, the process group, and the
few collectives the training loop needs.

``torchrun`` (or ``python -m torch.distributed.run``) starts one process per GPU (or per
CPU share) and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address. With ``WORLD_SIZE > 1`` :func:`init` joins the process group: NCCL when the
loop trains on CUDA (each process on the GPU of its ``LOCAL_RANK``), gloo on the CPU.
In a single process nothing here communicates: every helper is a no-op or the
identity, so a plain run does exactly what it did before this module existed.

What the loop builds on:

- :class:`ShardedBatches`: every rank draws the same per-epoch permutation and takes
  its own slice of each *global* batch (``train.batch_size`` stays the global size).
- :func:`wrap`: ``DistributedDataParallel`` over a view of the task that registers
  exactly the parameters the optimizer updates (see :class:`TrainableView`).
- :func:`broadcast_tensors`, :func:`broadcast_object`, :func:`reduce_sums`,
  :func:`flagged_ranks`: keep buffers, resume state, metrics and stop decisions
  identical on every rank.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from pipeline.config.base import ConfigError
from pipeline.engine.device import pick_device


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several (``WORLD_SIZE > 1``)."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """True once this process is in a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 in a single process; read from the launcher before :func:`init`)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0) if launched() else 0


def world_size() -> int:
    """Number of training processes (1 in a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def local_rank() -> int:
    """Rank of this process on its own node (selects its GPU)."""
    return _env_int("LOCAL_RANK", 0) if launched() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs and outs."""
    return rank() == 0


def init() -> bool:
    """Join the process group if a launcher started several processes; idempotent.

    Returns True when this run is distributed. NCCL on CUDA (the process's device is
    set to ``cuda:LOCAL_RANK``, as :func:`~pipeline.engine.device.pick_device` picks it), gloo on
    the CPU, where each process keeps its share of the cores (torchrun sets
    ``OMP_NUM_THREADS=1`` unless told otherwise; without it the cores are split evenly).
    """
    if not launched():
        return False
    if dist.is_initialized():
        return active()
    device = pick_device()
    if device.type == "cuda":
        if device.index is None:  # KDPIPE_DEVICE=cuda: still one GPU per local rank
            device = torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = max(1, _env_int("LOCAL_WORLD_SIZE", world_size()))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group(backend="gloo")
    atexit.register(cleanup)
    return active()


def cleanup() -> None:
    """Leave the process group (safe to call more than once, and in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled between our own processes; identity when alone)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Per-key sums over the ranks, identical on every rank (keys missing on a rank count as 0).

    The per-rank dicts are gathered and added in rank order, so every rank computes
    exactly the same floats; keys keep their first-seen order (rank 0's first).
    """
    if not active():
        return dict(values)
    gathered: list[dict[str, float] | None] = [None] * world_size()
    dist.all_gather_object(gathered, dict(values))
    out: dict[str, float] = {}
    for part in gathered:
        for k, v in (part or {}).items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def flagged_ranks(flag: bool) -> list[int]:
    """The ranks on which ``flag`` is True; every rank gets the same list (one small all-reduce)."""
    if not active():
        return [0] if flag else []
    flags = torch.zeros(world_size(), dtype=torch.int32, device=_comm_device())
    flags[rank()] = int(flag)
    dist.all_reduce(flags)
    return [i for i, f in enumerate(flags.tolist()) if f]


def gather_cat(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0, in rank order (``t`` itself in a single process).

    The shards of one global batch have equal sizes (see :func:`local_batch_size`), which
    ``all_gather`` needs. No gradient flows through the result.
    """
    if not active():
        return t
    device = _comm_device()
    local = t.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def sum_increments(tensors: Iterable[Tensor], since: Iterable[Tensor]) -> None:
    """Add every rank's increase of ``tensors`` since the values ``since`` (equal on all ranks), in place.

    For running sums over samples: each rank saw its own shard, and afterwards every
    rank holds ``since`` plus the increase over all shards, what one process would hold.
    """
    if not active():
        return
    device = _comm_device()
    for t, start in zip(tensors, since, strict=True):
        buf = (t.detach() - start).to(device).contiguous()
        dist.all_reduce(buf)
        with torch.no_grad():
            t.copy_(start + buf.to(t.device))


def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. buffers after an epoch)."""
    if not active():
        return
    device = _comm_device()
    for t in tensors:
        dtype = torch.uint8 if t.dtype == torch.bool else t.dtype  # gloo has no bool collectives
        buf = t.detach().to(device=device, dtype=dtype).contiguous()
        dist.broadcast(buf, src=src)
        if buf.data_ptr() != t.data_ptr():
            with torch.no_grad():
                t.copy_(buf.to(dtype=t.dtype))


# ----------------------------------------------------------------------------- sampling


def local_batch_size(global_batch: int, world: int) -> int:
    """Samples per rank and step: ``train.batch_size`` is the global batch, split evenly over the ranks."""
    if global_batch % world:
        raise ConfigError(
            f"train.batch_size={global_batch} (the global batch size of this run, after any teacher.train or "
            f"students.<name>.train override) cannot be split evenly over {world} training processes; "
            f"allowed: a multiple of {world}"
        )
    return global_batch // world


class ShardedBatches(Sampler[list[int]]):
    """This rank's share of every global batch of one epoch.

    Every rank draws the same permutation of the training set from ``generator`` (the
    per-epoch generator of :func:`~pipeline.engine.seeding.seed_epoch`, so it is the
    order a single process would use) and cuts it into global batches of
    ``global_batch``; global batch ``i`` is split into ``world`` contiguous slices of
    ``global_batch / world`` samples and rank ``r`` takes slice ``r``. Together the
    ranks see, step by step, exactly the batches of a single-process run.

    The last, partial global batch is trimmed to a multiple of ``world`` (every rank
    must contribute the same number of samples for the gradient average to be the
    global mean) and dropped if that leaves a rank fewer than 2 samples (batch norm
    cannot train on one). At most ``2 * world - 1`` samples per epoch are skipped, a
    different few each epoch.
    """

    def __init__(self, size: int, global_batch: int, rank: int, world: int, generator: torch.Generator) -> None:
        self.size = size
        self.rank = rank
        self.world = world
        self.per_rank = local_batch_size(global_batch, world)
        self.generator = generator
        full, rest = divmod(size, global_batch)
        self.shares = [self.per_rank] * full
        if rest // world >= 2:
            self.shares.append(rest // world)

    def __len__(self) -> int:
        return len(self.shares)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        start = 0
        for share in self.shares:
            lo = start + self.rank * share
            yield order[lo:lo + share]
            start += share * self.world


# ----------------------------------------------------------------------------- the DDP wrapper


class TrainableView(nn.Module):
    """What DDP wraps: the task's ``forward``, with only the parameters the optimizer updates registered.

    Why not DDP over the whole ``Distiller``: DDP would then also own the frozen
    teacher (and a method's frozen anchor networks, and heads that need ``requires_grad``
    but are not optimised in a phase, e.g. SSKD's teacher head or AB's connectors after
    their phase): it would broadcast their weights and buffers, and treat their
    parameters as expected gradients. Here the task is held as a plain attribute (not a
    registered child), so DDP sees the optimizer's parameters and nothing else; the
    frozen networks are each rank's own identical, read-only copies. Buffers (batch-norm
    statistics, method state) are not DDP's business either: the loop broadcasts them
    from rank 0 at the end of every epoch, which gives every rank rank 0's statistics,
    as DDP's own buffer broadcast would.
    """

    def __init__(self, task: nn.Module, params: Iterable[nn.Parameter]) -> None:
        super().__init__()
        object.__setattr__(self, "task", task)  # held, not registered: DDP must not see the teacher
        names = {id(p): n for n, p in task.named_parameters()}
        seen: set[int] = set()
        for i, p in enumerate(params):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            self.register_parameter(names.get(id(p), f"param{i}").replace(".", "__"), p)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)


def wrap(task: nn.Module, params: Iterable[nn.Parameter], device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` over :class:`TrainableView` (call it in place of ``task``).

    ``find_unused_parameters=True`` always: some methods leave trainable parameters out
    of the graph in some phases or steps (heads unused until a ramp, branches of online
    methods, a method's own schedule), which DDP otherwise reports as an error at the
    next step. The cost is one walk over the autograd graph per step, small next to the
    forward and backward passes it follows. The view holds no buffers, so DDP's own
    buffer broadcast has nothing to do.
    """
    from torch.nn.parallel import DistributedDataParallel

    view = TrainableView(task, params)
    return DistributedDataParallel(
        view,
        device_ids=[torch.cuda.current_device() if device.index is None else device.index]
        if device.type == "cuda" else None,
        find_unused_parameters=True,
    )
