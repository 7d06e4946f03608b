"""Raw score → normalised score and OK/NG verdict, from the artifact's calibration.

The normalisation is anomalib's min-max around the threshold: the threshold maps to
0.5, the calibration set's min and max span one unit, and the result is clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class Calibration(BaseModel):
    """What `patchline calibrate` writes into the manifest's ``calibration`` field."""

    model_config = ConfigDict(extra="forbid")

    image_threshold: float
    pixel_threshold: float | None = None
    score_min: float  # lowest / highest raw score seen in calibration: the normalisation span
    score_max: float
    method: str  # how the threshold was chosen, for the engineer reading the manifest
    details: dict = {}


@dataclass(frozen=True)
class Decision:
    score: float
    normalised: float | None
    threshold: float
    verdict: str  # "OK" or "NG"


def normalise(score: float, calibration: Calibration) -> float:
    span = max(calibration.score_max - calibration.score_min, 1e-12)
    return min(1.0, max(0.0, (score - calibration.image_threshold) / span + 0.5))


def decide(score: float, calibration: Calibration | None, threshold: float | None = None) -> Decision:
    """NG when the raw score exceeds the threshold: the calibrated one unless ``threshold`` overrides it."""
    if calibration is None and threshold is None:
        raise ValueError("no threshold: calibrate the artifact (patchline calibrate) or set one in the config")
    limit = threshold if threshold is not None else calibration.image_threshold
    normalised = normalise(score, calibration) if calibration is not None else None
    return Decision(score, normalised, limit, "NG" if score > limit else "OK")
