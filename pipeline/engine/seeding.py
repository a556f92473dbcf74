"""Seeding that makes CPU runs bit-reproducible and resumable at epoch boundaries."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 31-bit seed derived from any parts (run seed, epoch, purpose), stable across processes."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        # CPU kernels are already deterministic for a fixed thread count; on CUDA ask for it
        # (this import of torch's compiler stack costs ~3 s, so CPU runs skip it).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Reseed the global RNGs for one epoch and return the loader's shuffling generator.

    Each epoch's randomness (shuffle order, augmentation, dropout) depends only on
    (seed, epoch), so a run resumed at an epoch boundary replays exactly what an
    uninterrupted run would have done.

    Under DDP every ``rank`` gets the same shuffling generator (all ranks cut their
    shards from one permutation), but its own global RNG stream, so two ranks never
    draw the same augmentation or dropout for the samples at the same position of
    their shards. Rank 0's stream is the single-process one.
    """
    s = derive_seed(seed, "epoch", epoch) if rank == 0 else derive_seed(seed, "epoch", epoch, "rank", rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, "shuffle", epoch))
    return gen


def rng_state() -> dict:
    """The global RNG states as plain tensors and ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed_worker_for_rank(rank: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` under DDP (use with ``functools.partial(reseed_worker_for_rank, rank)``).

    Workers are seeded from the loader's generator, which is the same on every rank;
    this folds the rank in so that the workers of different ranks augment differently.
    """
    s = derive_seed(torch.initial_seed(), "worker", rank, worker_id)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
