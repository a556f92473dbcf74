"""Progress on long work: a bar per epoch on a terminal, one plain line per epoch in logs/CI."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Literal, TypeVar

from pipeline.engine import distributed

T = TypeVar("T")
Mode = Literal["auto", "bar", "lines", "off"]


def resolve_mode(mode: Mode) -> Mode:
    """``auto`` is a bar on an interactive terminal and plain lines elsewhere (CI, log files)."""
    if mode != "auto":
        return mode
    if os.environ.get("CI") or not sys.stderr.isatty():
        return "lines"
    return "bar"


class Progress:
    """Reports a run's epochs; the bar is tqdm, lines go to stderr with a run label."""

    def __init__(self, label: str, epochs: int, mode: Mode | None = None) -> None:
        self.label = label
        self.epochs = epochs
        chosen = mode or os.environ.get("KDPIPE_PROGRESS", "auto")
        if chosen not in ("auto", "bar", "lines", "off"):
            raise ValueError(f"KDPIPE_PROGRESS={chosen!r}; allowed: auto, bar, lines, off")
        self.mode = resolve_mode(chosen)  # type: ignore[arg-type]
        if distributed.rank() != 0:  # under DDP rank 0 alone reports (the ranks agree on every metric)
            self.mode = "off"
        self._t0 = time.perf_counter()

    def steps(self, iterable: Iterable[T], epoch: int, total: int | None = None) -> Iterator[T]:
        """Wrap one epoch's batches; shows a bar only in bar mode."""
        if self.mode != "bar":
            yield from iterable
            return
        from tqdm import tqdm

        desc = f"{self.label} {epoch + 1}/{self.epochs}"
        yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def epoch_done(self, epoch: int, metrics: dict[str, float]) -> None:
        """One summary line per epoch (all modes but ``off``)."""
        self._t0, elapsed = time.perf_counter(), time.perf_counter() - self._t0
        if self.mode == "off":
            return
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"[{self.label}] epoch {epoch + 1}/{self.epochs} {shown} ({elapsed:.1f}s)", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A one-off message (resume, skip) in every mode but ``off``."""
        if self.mode != "off":
            print(f"[{self.label}] {text}", file=sys.stderr, flush=True)
