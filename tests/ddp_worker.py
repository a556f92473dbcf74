"""One process of the DDP test (tests/test_ddp.py); also runs alone as the single-process reference.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py ROOT OUT RUN [RUN ...]

Trains each RUN (``teacher``, ``baseline:<student>``, ``distill:<student>:<method>`` or
``online:<student>:<method>``) in workspace ROOT through the stage entry point
(:func:`stages._common.run_stage` + :func:`pipeline.runs.train`, as ``dvc repro`` does),
while recording every file this process writes under ROOT: destinations of
``os.replace`` (all of the pipeline's atomic writes end in one) and files opened for
writing (DVCLive and any other direct write). The RUN ``engine`` calls the training
loop directly instead (:func:`engine_checks`: a resumed run, a non-finite loss on the
last rank, and a batch-norm-free model whose weights a single process must reproduce).

Then writes ``OUT/rank<r>.json``: those paths, a hash of each run's trained state
(trainable weights and buffers) as this rank holds it, and the engine checks' facts.
OUT is outside ROOT; that file is the test's own write.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script (tests/ is sys.path[0]): import stages/ from the checkout

import torch  # noqa: E402

from pipeline import runs  # noqa: E402
from pipeline.engine.checkpoint import state_digest  # noqa: E402
from pipeline.runs import RunId  # noqa: E402
from stages._common import run_stage  # noqa: E402
from tests.conftest import fit_until_crash  # noqa: E402


def _run_id(text: str) -> RunId:
    role, *rest = text.split(":")
    return RunId(role, *rest)


def engine_checks(params, root: Path) -> dict:
    """Facts about :func:`pipeline.engine.loop.fit` itself in this process group (or alone)."""
    from pipeline.data import build_data
    from pipeline.distill import Vanilla
    from pipeline.engine import distributed, loop
    from pipeline.engine.checkpoint import load_torch
    from pipeline.models import build

    facts: dict = {}
    data = build_data(params.data, params.seed)
    cfg = params.train.model_copy(update={"epochs": 3})
    state = root / ".kdpipe" / "engine-checks"

    def staged_net() -> Vanilla:
        torch.manual_seed(0)
        return Vanilla(build("tinynet_s", data.num_classes, data.in_channels, data.image_size))

    def spec(name: str) -> loop.RunSpec:
        return loop.RunSpec(label=name, state_dir=state / name, fingerprint="engine-checks")

    # Resume: every rank stops after epoch 1 (as a killed job would), then all resume from rank 0's last.pt.
    full = staged_net()
    loop.fit(full, data.train, data.val, cfg, params.seed, spec("full"))
    fit_until_crash(0, staged_net(), data.train, data.val, cfg, params.seed, spec("cut"))
    torch.manual_seed(123)  # a different start: everything must come from the checkpoint
    resumed = Vanilla(build("tinynet_s", data.num_classes, data.in_channels, data.image_size))
    result = loop.fit(resumed, data.train, data.val, cfg, params.seed, spec("cut"))
    facts["resumed_from"] = result.resumed_from
    facts["resume_equals_uninterrupted"] = state_digest(resumed.trainable_state_dict()) == state_digest(full.trainable_state_dict())

    # A non-finite loss on the last rank only, in the second epoch: every rank must stop there.
    last_rank = distributed.world_size() - 1

    class Exploding(Vanilla):
        def forward(self, images, labels, indices):
            logits, terms = super().forward(images, labels, indices)
            if self.epoch == 1 and distributed.rank() == last_rank:
                terms["ce"] = terms["ce"] * float("nan")
            return logits, terms

    torch.manual_seed(0)
    try:
        loop.fit(Exploding(build("tinynet_s", data.num_classes, data.in_channels, data.image_size)),
                 data.train, data.val, cfg, params.seed, spec("nan"))
        facts["non_finite"] = None
    except loop.NonFiniteLossError as err:
        facts["non_finite"] = str(err)
    if distributed.is_main():
        facts["non_finite_last_epoch"] = load_torch(state / "nan" / "last.pt")["epoch"]

    # Buffers a method declares rank-summed hold the single-process total after each epoch; others rank 0's.
    class Counting(Vanilla):
        def __init__(self, student):
            super().__init__(student)
            self.register_buffer("seen_all", torch.zeros((), dtype=torch.float64))
            self.register_buffer("seen_here", torch.zeros((), dtype=torch.float64))

        def rank_summed_buffers(self):
            return ("seen_all",)

        def forward(self, images, labels, indices):
            self.seen_all += labels.shape[0]
            self.seen_here += labels.shape[0]
            return super().forward(images, labels, indices)

    torch.manual_seed(0)
    counting = Counting(build("tinynet_s", data.num_classes, data.in_channels, data.image_size))
    loop.fit(counting, data.train, data.val, cfg, params.seed, spec("counting"))
    facts["counted"] = {"all": float(counting.seen_all), "here": float(counting.seen_here),
                        "train_samples": len(data.train), "epochs": cfg.epochs}

    # No batch norm, no augmentation: the ranks' shards of each global batch give the single-process gradient.
    plain = build_data(params.data.model_copy(update={"augment": False}), params.seed)
    torch.manual_seed(0)
    linear = Vanilla(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(
        plain.in_channels * plain.image_size ** 2, plain.num_classes)))
    history = loop.fit(linear, plain.train, plain.val, cfg, params.seed, spec("linear")).history
    facts["linear_weights"] = [float(x) for p in linear.student.parameters() for x in p.detach().flatten()]
    facts["linear_history"] = history
    return facts


def main(root: Path, out: Path, run_texts: list[str]) -> None:
    root = root.resolve()
    writes: set[str] = set()

    def note(path: object) -> None:
        if isinstance(path, int):
            return
        p = Path(os.fsdecode(path)).resolve()
        if p == root or root in p.parents:
            writes.add(str(p.relative_to(root)))

    real_replace, real_open, real_os_open = os.replace, builtins.open, os.open

    def spy_replace(src, dst, *a, **k):
        note(dst)
        return real_replace(src, dst, *a, **k)

    def spy_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            note(file)
        return real_open(file, mode, *a, **k)

    def spy_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            note(path)
        return real_os_open(path, flags, *a, **k)

    os.replace, builtins.open, io.open, os.open = spy_replace, spy_open, spy_open, spy_os_open

    trained: dict[str, str] = {}
    real_fit = runs.fit

    def spy_fit(task, *args, **kwargs):
        result = real_fit(task, *args, **kwargs)
        spec = args[4] if len(args) > 4 else kwargs["spec"]
        trained[spec.label] = state_digest(task.trainable_state_dict())
        return result

    runs.fit = spy_fit

    facts: dict = {}

    def body(params):
        for text in run_texts:
            if text == "engine":
                facts.update(engine_checks(params, root))
            else:
                runs.train(params, _run_id(text), root)

    run_stage("distill", body, params_path=str(root / "params.yaml"))
    os.replace, builtins.open, io.open, os.open = real_replace, real_open, real_open, real_os_open

    rank = int(os.environ.get("RANK", "0"))
    report = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "trained": trained,
              "writes": sorted(writes), "engine": facts}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
