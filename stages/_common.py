"""What every stage shares: loading params once and turning known errors into clean exits.

Several processes (torchrun). A training stage started by ``torchrun`` (or
``python -m torch.distributed.run``) trains data-parallel on every rank and rank 0
alone writes its outs; any other stage started that way runs on rank 0 only. With
``KDPIPE_TORCHRUN`` set (torchrun's own arguments, e.g. ``--standalone --nproc_per_node 4``),
a training stage started the plain way (``python -m stages.train_teacher``, as dvc.yaml
does) starts itself again under torchrun with those arguments, so ``dvc repro`` trains
on several GPUs or nodes without any change to dvc.yaml.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.errors import UserError
from pipeline.params import Params, load_params
from pipeline.run_state import prune_recorded
from pipeline.threads import apply_cpu_threads

#: Stages that train, and so run on every rank under torchrun (the others run on rank 0 alone).
TRAINING_STAGES = frozenset({"train_teacher", "train_student", "distill", "online"})

#: Environment variable holding torchrun arguments for training stages started the plain way.
TORCHRUN_ENV = "KDPIPE_TORCHRUN"


def _under_launcher() -> bool:
    """True in a process torchrun started (it sets these for every worker, even a single one)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_command(torchrun_args: str, argv: Sequence[str], module: str | None) -> list[str]:
    """The command that runs this stage again under torchrun with ``torchrun_args``.

    ``module`` is the stage's module name when it was started with ``python -m`` (how
    dvc.yaml starts stages: workers then import the workspace's code, as the stage did);
    otherwise the script path ``argv[0]`` is used.
    """
    target = ["-m", module] if module else [argv[0]]
    return [sys.executable, "-m", "torch.distributed.run", *shlex.split(torchrun_args), *target, *argv[1:]]


def relaunch_command(name: str) -> list[str] | None:
    """The torchrun command to start training stage ``name`` again under, if ``KDPIPE_TORCHRUN`` asks for it."""
    args = os.environ.get(TORCHRUN_ENV, "").strip()
    if not args or name not in TRAINING_STAGES or _under_launcher():
        return None
    import __main__

    spec = getattr(__main__, "__spec__", None)
    return torchrun_command(args, sys.argv, spec.name if spec is not None else None)


def run_stage(name: str, body: Callable[[Params], object], params_path: str = "params.yaml") -> None:
    """Validate params, run ``body``; on a user error print ``<stage>: <message>`` and exit 2.

    Under torchrun a training stage (``TRAINING_STAGES``) runs ``body`` on every rank;
    any other stage on rank 0 only.
    """
    dist = None
    if name in TRAINING_STAGES or _under_launcher():  # other stages need not pay for importing torch
        from pipeline.engine import distributed as dist
    try:
        params = load_params(Path(params_path))  # a bad config stops here, before any launch
        apply_cpu_threads(params.cpu_threads)
        cmd = relaunch_command(name)
        if cmd is not None:  # this process becomes torchrun: signals, output and exit code are its own
            print(f"{name}: {TORCHRUN_ENV} is set, running: {shlex.join(cmd)}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os.execv(cmd[0], cmd)
        if dist is not None and name in TRAINING_STAGES:
            dist.init()
        if dist is None or dist.is_main():
            pruned = prune_recorded(Path("."))  # finished runs' kept state, once DVC recorded their outs
            if pruned:
                print(f"{name}: removed the kept state of finished runs DVC has recorded: {', '.join(pruned)}",
                      file=sys.stderr, flush=True)
        if dist is None or name in TRAINING_STAGES or dist.is_main():
            body(params)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
        if isinstance(err, UserError):
            who = f" (rank {dist.rank()})" if dist is not None and dist.launched() else ""
            print(f"{name}{who}: error: {err}", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        if dist is not None:
            dist.cleanup()
