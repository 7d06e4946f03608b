"""Raw score → normalised score and OK/NG verdict, from the artifact's calibration.

The normalisation is anomalib's min-max around the threshold: the threshold maps to
0.5, the calibration set's min and max span one unit, and the result is clipped to [0, 1].
When the run config overrides the calibrated threshold, the normalisation centres on the
threshold in use, so that normalised > 0.5 always means NG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from patchline.runtime.search.distance import NonFiniteError


class Calibration(BaseModel):
    """What `patchline calibrate` writes into the manifest's ``calibration`` field."""

    model_config = ConfigDict(extra="forbid")

    image_threshold: float
    pixel_threshold: float | None = None
    score_min: float  # lowest / highest raw score seen in calibration: the normalisation span
    score_max: float
    method: str  # how the threshold was chosen, for the engineer reading the manifest
    details: dict = {}

    @property
    def span(self) -> float:
        """Raw-score width of one normalised unit."""
        return max(self.score_max - self.score_min, 1e-12)


@dataclass(frozen=True)
class Decision:
    score: float
    normalised: float | None
    threshold: float
    verdict: str  # "OK" or "NG"


def rejected(score: float | np.ndarray, threshold: float) -> bool | np.ndarray:
    """The reject rule, for one score or an array of them: NG when the score exceeds the threshold."""
    return score > threshold


def normalise(score: float, calibration: Calibration, threshold: float | None = None) -> float:
    """Min-max normalised score around ``threshold`` (default: the calibrated one); > 0.5 exactly when NG."""
    limit = calibration.image_threshold if threshold is None else threshold
    value = min(1.0, max(0.0, (score - limit) / calibration.span + 0.5))
    if rejected(score, limit) and value <= 0.5:  # a difference too small to show after adding 0.5
        value = float(np.nextafter(0.5, 1.0))
    return value


def decide(score: float, calibration: Calibration | None, threshold: float | None = None) -> Decision:
    """NG when the raw score exceeds the threshold: the calibrated one unless ``threshold`` overrides it.

    A NaN score is never NG by the rule (NaN > t is false): it raises NonFiniteError instead of passing as OK."""
    if not math.isfinite(score):
        raise NonFiniteError(f"score {score} is not a finite number: no verdict")
    if calibration is None and threshold is None:
        raise ValueError("no threshold: calibrate the artifact (patchline calibrate) or set one in the config")
    limit = threshold if threshold is not None else calibration.image_threshold
    normalised = normalise(score, calibration, limit) if calibration is not None else None
    return Decision(score, normalised, limit, "NG" if rejected(score, limit) else "OK")
