"""Training under torchrun: sharding, rank-0-only writes, ranks that agree, and a single process reproduced.

The end-to-end test starts 2 processes with gloo on the CPU (``python -m
torch.distributed.run``); each runs ``tests/ddp_worker.py``, which trains through the
stage entry point and reports what its rank wrote and holds. The same worker run
alone (world size 1) is the single-process reference.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config.base import ConfigError
from pipeline.engine import distributed
from pipeline.engine.progress import Progress
from pipeline.engine.seeding import seed_epoch
from stages import _common
from tests.conftest import REPO, tiny_params, write_params

# -- sharding ----------------------------------------------------------------------------------


def _single_process_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches the loop's single-process DataLoader yields (indices), drop_last as the loop sets it."""
    data = TensorDataset(torch.arange(n))
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=seed_epoch(seed, epoch),
                        drop_last=n % batch == 1)
    return [b[0].tolist() for b in loader]


def _rank_batches(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """One rank's batches as the loop builds them under DDP (its generator drawn exactly as the loop does)."""
    gen = seed_epoch(seed, epoch, rank)
    data = TensorDataset(torch.arange(n))
    loader = DataLoader(data, batch_sampler=distributed.ShardedBatches(n, batch, rank, world, gen), generator=gen)
    return [b[0].tolist() for b in loader]


@pytest.mark.parametrize(("n", "batch", "world"), [(100, 32, 2), (96, 32, 2), (101, 32, 4), (70, 8, 4), (40, 40, 2)])
def test_ranks_split_the_single_process_global_batches(n, batch, world):
    single = _single_process_batches(n, batch, seed=3, epoch=5)
    ranks = [_rank_batches(n, batch, 3, 5, r, world) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # every rank takes the same number of steps
    for step, parts in enumerate(zip(*ranks, strict=True)):
        assert len({len(p) for p in parts}) == 1  # and the same number of samples per step
        joined = [i for p in parts for i in p]
        assert joined == single[step][: len(joined)]  # rank r holds slice r of the single-process batch
    full_steps, rest = divmod(n, batch)
    tail = (rest // world) * world if rest // world >= 2 else 0
    assert sum(len(p) for r in ranks for p in r) == full_steps * batch + tail
    seen = [i for r in ranks for p in r for i in p]
    assert len(seen) == len(set(seen))


def test_global_batch_size_must_split_over_the_ranks():
    assert distributed.local_batch_size(64, 4) == 16
    with pytest.raises(ConfigError, match=r"train\.batch_size=30 .* 4 training processes.* a multiple of 4"):
        distributed.local_batch_size(30, 4)


def test_rank_streams_differ_but_rank_zero_is_the_single_process_one():
    gen0 = seed_epoch(7, 2)
    a = torch.rand(4)
    gen_r0 = seed_epoch(7, 2, rank=0)
    assert torch.equal(torch.rand(4), a)
    gen_r1 = seed_epoch(7, 2, rank=1)
    assert not torch.equal(torch.rand(4), a)  # rank 1 augments with its own stream
    perms = [torch.randperm(50, generator=g) for g in (gen0, gen_r0, gen_r1)]
    assert torch.equal(perms[0], perms[1]) and torch.equal(perms[0], perms[2])  # one shuffle for all ranks


# -- a single process and the launcher's environment -------------------------------------------


def test_single_process_helpers_do_nothing(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.reduce_sums({"a": 1.5}) == {"a": 1.5}
    assert distributed.flagged_ranks(True) == [0] and distributed.flagged_ranks(False) == []
    obj = {"x": torch.ones(2)}
    assert distributed.broadcast_object(obj) is obj
    distributed.barrier()
    distributed.cleanup()


def test_launcher_rank_is_known_before_the_group_exists(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.launched() and distributed.rank() == 1 and not distributed.is_main()
    assert Progress("run", 3, mode="lines").mode == "off"  # only rank 0 reports


def test_torchrun_relaunch_command(monkeypatch):
    cmd = _common.torchrun_command("--standalone --nproc_per_node 2", ["/x/stages/distill.py", "--student", "s"],
                                   "stages.distill")
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "stages.distill", "--student", "s"]
    monkeypatch.delenv(_common.TORCHRUN_ENV, raising=False)
    assert _common.relaunch_command("train_teacher") is None  # not asked for
    monkeypatch.setenv(_common.TORCHRUN_ENV, "--nproc_per_node 2")
    assert _common.relaunch_command("evaluate") is None  # not a training stage
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _common.relaunch_command("train_teacher") is None  # already a torchrun worker
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    cmd = _common.relaunch_command("train_teacher")
    assert cmd is not None and cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]


# -- two processes, end to end ------------------------------------------------------------------

EPOCHS = 6
RUNS = ["teacher", "distill:tinynet_s:kd", "distill:tinynet_s:crd", "online:tinynet_s:dml"]
KEYS = ["teacher", "kd/tinynet_s", "crd/tinynet_s", "dml/tinynet_s"]
# Final validation top-1 of the 2-process run vs the single process (72 validation images, 1.4 points each).
# Both runs see the same global batches, but each rank normalises its batch-norm layers over its own 16
# images (not 32) and rank 1 draws its own augmentations, so they are not bit-identical; on this config
# every run converges (100 % on 3 seeds, both ways), so 3 images of 72 is ample and still catches a run
# that learns from half the data or scores half the validation set.
ACCURACY_TOLERANCE = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (_common.TORCHRUN_ENV, "WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    env["KDPIPE_PROGRESS"] = "lines"
    return env


def _worker(cmd: list[str], root: Path, out: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    args = [*cmd, str(REPO / "tests" / "ddp_worker.py"), str(root), str(out), *RUNS, "engine"]
    log = out.with_suffix(".log")
    with log.open("w") as fh:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT), log


def _wait(started: tuple[subprocess.Popen, Path]) -> None:
    proc, log = started
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, log.read_text()[-8000:]


def _normalise(writes: list[str]) -> set[str]:
    """Temp names (``.<name>.<random>.tmp``) differ from run to run; the rest must not."""
    return {re.sub(r"\.([^/]+)\.[^/.]+\.tmp", r".\1.<tmp>", w) for w in writes}


@pytest.mark.slow
def test_two_processes_agree_write_once_and_match_a_single_process(tmp_path: Path):
    params = tiny_params(data={"synthetic_samples": 480}, train={"epochs": EPOCHS},
                         online={"methods": ["dml"]})
    ddp_root, single_root = tmp_path / "ddp", tmp_path / "single"
    for root in (ddp_root, single_root):
        root.mkdir()
        write_params(root / "params.yaml", params)

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(_free_port())]
    # Both at once (their results do not depend on timing): the startup of one overlaps the other's training.
    ddp = _worker(launch, ddp_root, tmp_path / "out_ddp", _env())
    alone = _worker([sys.executable], single_root, tmp_path / "out_single", {**_env(), "OMP_NUM_THREADS": "1"})
    _wait(ddp)
    _wait(alone)
    rank0, rank1 = (json.loads((tmp_path / "out_ddp" / f"rank{r}.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "out_single" / "rank0.json").read_text())
    assert (rank0["world"], rank1["world"], single["world"]) == (2, 2, 1)

    # (1) both ranks end every run with the same weights and buffers
    assert sorted(rank0["trained"]) == sorted(KEYS)
    assert rank0["trained"] == rank1["trained"]

    # (2) rank 1 wrote nothing; rank 0 wrote exactly what a single process writes
    assert rank1["writes"] == []
    assert _normalise(rank0["writes"]) == _normalise(single["writes"])
    for key in KEYS:
        assert {f"runs/{key}", f"live/{key}", f".kdpipe/state/{key}/main/last.pt"} <= set(rank0["writes"])
        assert (ddp_root / "runs" / key / "model.pt").is_file()
        for tsv in ("train/loss.tsv", "val/top1.tsv"):
            rows = (ddp_root / "live" / key / "plots" / "metrics" / tsv).read_text().splitlines()
            assert len(rows) == 1 + EPOCHS  # header + one row per epoch, from one process
    assert (ddp_root / "runs" / "dml" / "tinynet_s" / "ensemble.pt").is_file()
    assert sorted(p.name for p in (ddp_root / "runs" / "teacher" / "route").iterdir()) == \
        [f"epoch_{e:04d}.pt" for e in range(1, EPOCHS + 1)]
    assert (ddp_root / ".kdpipe" / "state" / "teacher" / "finished.json").is_file()  # kept until DVC records the outs

    # (3) the accuracy of a single process with the same global batch, within noise
    for key in KEYS:
        ddp_top1 = json.loads((ddp_root / "runs" / key / "train.json").read_text())["final"]["val/top1"]
        one_top1 = json.loads((single_root / "runs" / key / "train.json").read_text())["final"]["val/top1"]
        assert abs(ddp_top1 - one_top1) <= ACCURACY_TOLERANCE, (key, ddp_top1, one_top1)

    # the loop itself: resume on every rank, a non-finite loss on rank 1 stops both, exact single-process maths
    for rank in (rank0, rank1):
        facts = rank["engine"]
        assert facts["resumed_from"] == 1 and facts["resume_equals_uninterrupted"]
        assert re.search(r"rank\(s\) \[1\] at epoch 2, step 1", facts["non_finite"] or "")
    assert rank0["engine"]["non_finite_last_epoch"] == 1
    counted = [r["engine"]["counted"] for r in (rank0, rank1, single)]
    every_sample = counted[2]["train_samples"] * counted[2]["epochs"]
    assert [c["all"] for c in counted] == [every_sample] * 3  # summed over the ranks, as one process counts
    # the rest are rank 0's: the same on both ranks, and only rank 0's shard of the last epoch was added to them
    assert counted[0]["here"] == counted[1]["here"] < every_sample
    assert rank0["engine"]["linear_weights"] == rank1["engine"]["linear_weights"]
    np.testing.assert_allclose(rank0["engine"]["linear_weights"], single["engine"]["linear_weights"], atol=1e-5)
    for got, want in zip(rank0["engine"]["linear_history"], single["engine"]["linear_history"], strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
