"""Threshold choices on raw scores, and what each one does to a labelled set.

Verdicts follow ``patchline.runtime.decision.decide``: NG when score > threshold, so every
threshold here is placed so that this strict comparison gives the intended split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import precision_recall_curve

from patchline.runtime.decision import rejected as is_rejected


@dataclass(frozen=True)
class Confusion:
    true_ng: int  # defective, rejected
    false_ng: int  # good, rejected: a false reject
    true_ok: int  # good, accepted
    false_ok: int  # defective, accepted: a false accept (escape)

    @property
    def f1(self) -> float:
        return 2 * self.true_ng / max(2 * self.true_ng + self.false_ng + self.false_ok, 1)


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Confusion:
    labels = np.asarray(labels, bool)
    rejected = is_rejected(np.asarray(scores), threshold)
    return Confusion(
        true_ng=int((rejected & labels).sum()),
        false_ng=int((rejected & ~labels).sum()),
        true_ok=int((~rejected & ~labels).sum()),
        false_ok=int((~rejected & labels).sum()),
    )


def _just_below(values: np.ndarray, cut: float) -> float:
    """Midway between ``cut`` and the largest value under it: values ≥ cut are then exactly those > result."""
    lower = values[values < cut]
    return float((lower.max() + cut) / 2) if lower.size else float(np.nextafter(cut, -np.inf))


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The F1-optimal split (anomalib's F1AdaptiveThreshold), as a threshold for ``score > threshold``.

    anomalib keeps the score at which the best split starts (NG when score ≥ it); here the
    threshold sits midway between the last accepted and the first rejected score, which gives
    the same split on this set and leaves room both ways for new parts.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if labels.min() == labels.max():
        raise ValueError("an F1 threshold needs both good and defective samples")
    precision, recall, cuts = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[: len(cuts)]))  # the first maximum: the lowest cut among equals, as anomalib
    return _just_below(scores, float(cuts[best]))


def quantile_threshold(good: np.ndarray, quantile: float, margin: float) -> float:
    """``margin`` × the ``quantile`` of good scores (e.g. p99.5 × 1.1): for good-only validation sets."""
    if not 0.0 < quantile <= 1.0 or margin <= 0:
        raise ValueError(f"quantile must be in (0, 1] and margin > 0, got {quantile} and {margin}")
    return float(np.quantile(np.asarray(good, np.float64), quantile) * margin)


def false_reject_threshold(good: np.ndarray, max_rate: float) -> float:
    """The lowest threshold that rejects at most ``max_rate`` of the good scores.

    Lowest, because every lower threshold rejects one more good image and every higher one
    lets more defects pass. It is the highest good score that is still accepted.
    """
    if not 0.0 <= max_rate < 1.0:
        raise ValueError(f"max false-reject rate must be in [0, 1), got {max_rate}")
    ranked = np.sort(np.asarray(good, np.float64))[::-1]
    allowed = int(np.floor(max_rate * len(ranked) + 1e-9))
    return float(ranked[allowed])


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and what it does on the validation set."""

    method: str
    threshold: float
    false_reject_rate: float  # good images scored above the threshold
    false_accept_rate: float | None  # defective images at or below it (None without defects)
    f1: float | None
    confusion: Confusion

    def as_dict(self) -> dict:
        return asdict(self)


def operating_point(method: str, threshold: float, labels: np.ndarray, scores: np.ndarray) -> OperatingPoint:
    counts = confusion(labels, scores, threshold)
    good = counts.false_ng + counts.true_ok
    bad = counts.true_ng + counts.false_ok
    return OperatingPoint(
        method=method,
        threshold=float(threshold),
        false_reject_rate=counts.false_ng / good if good else 0.0,
        false_accept_rate=counts.false_ok / bad if bad else None,
        f1=counts.f1 if bad else None,
        confusion=counts,
    )
