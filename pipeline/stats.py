"""How sure a test-set accuracy is: its confidence interval, a paired test of two models, the gap recovered.

On a few hundred test images one image moves top-1 by a fraction of a point, so a
report that ranks models by top-1 alone ranks noise. These are the statistics every
report and ``kdpipe results`` print beside the accuracies:

* :func:`accuracy_interval`: the Wilson score interval of one model's top-1;
* :func:`paired_test`: the exact McNemar test of two models on the same images (a
  two-sided binomial test on the images exactly one of them gets right);
* :func:`gap_recovered`: how much of the teacher's lead over the student alone a
  distilled student recovers.

The distributions are scipy's; nothing here reads files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binomtest

#: The significance level the reports state their verdicts at.
ALPHA = 0.05
#: The confidence of every interval the reports print.
CONFIDENCE = 0.95


def accuracy_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of the accuracy ``correct / total``, in percent.

    Wilson's interval stays inside [0, 100] and keeps its coverage near 0 % and 100 %,
    where a normal approximation breaks down (a student at 99 % of 359 images).
    """
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"an accuracy needs 0 <= correct <= total and total > 0, got {correct} of {total}")
    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return 100.0 * float(ci.low), 100.0 * float(ci.high)


@dataclass(frozen=True)
class PairedTest:
    """Two models scored on the same test images: the images only one gets right, and the exact McNemar p."""

    only_model: int
    only_reference: int
    both: int
    neither: int
    p_value: float

    @property
    def total(self) -> int:
        """The number of test images."""
        return self.only_model + self.only_reference + self.both + self.neither

    @property
    def difference(self) -> float:
        """Model top-1 minus reference top-1, in points."""
        return 100.0 * (self.only_model - self.only_reference) / self.total if self.total else 0.0

    @property
    def significant(self) -> bool:
        """Whether the difference is significant at :data:`ALPHA`."""
        return self.p_value < ALPHA


def paired_test(model_correct: Sequence[bool], reference_correct: Sequence[bool]) -> PairedTest:
    """The exact McNemar test of a model against a reference, from each one's right/wrong on the same images.

    Only the discordant images carry information: under the hypothesis that both models
    are equally accurate, each of the ``b + c`` images exactly one of them gets right is
    the model's with probability 1/2, so ``p`` is the two-sided binomial test of ``b``
    of ``b + c``. With no discordant image, ``p`` is 1.
    """
    if len(model_correct) != len(reference_correct):
        raise ValueError(f"a paired test needs the same images: {len(model_correct)} predictions against "
                         f"{len(reference_correct)}")
    pairs = list(zip(map(bool, model_correct), map(bool, reference_correct), strict=True))
    b = sum(m and not r for m, r in pairs)
    c = sum(r and not m for m, r in pairs)
    both = sum(m and r for m, r in pairs)
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return PairedTest(only_model=b, only_reference=c, both=both, neither=len(pairs) - b - c - both, p_value=p)


def gap_recovered(model: float, alone: float, teacher: float) -> float | None:
    """``(model - alone) / (teacher - alone)``: the share of the teacher's lead a distilled student recovers.

    1 means the student caught up with the teacher, 0 that it gained nothing, below 0 that
    it lost ground. None when the teacher is not ahead of the student alone: there is no
    gap to recover, and the ratio would mean nothing.
    """
    gap = teacher - alone
    return None if gap <= 0 else (model - alone) / gap
