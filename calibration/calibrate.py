"""Choose an artifact's thresholds from validation scores and write them into its manifest.

Good images only: threshold = margin × a quantile of the good scores (default p99.5 × 1.1).
With labelled defects: the F1-optimal threshold, as anomalib's adaptive threshold. Either way
``max_false_reject`` picks the operating point instead: the lowest threshold rejecting at most
that share of good images. All points are reported and kept in ``calibration.details``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from patchline.calibration.dataset import defect_samples, good_samples
from patchline.calibration.scoring import ScoreSet, score_samples
from patchline.calibration.thresholds import (
    OperatingPoint,
    f1_threshold,
    false_reject_threshold,
    operating_point,
    quantile_threshold,
)
from patchline.runtime.artifact import Artifact, Manifest, now_iso, write_manifest
from patchline.runtime.decision import Calibration
from patchline.runtime.inspector import Inspector

DEFAULT_QUANTILE = 0.995
DEFAULT_MARGIN = 1.1
MIN_GOOD = 10
MIN_DEFECTIVE = 5


class CalibrationRefused(ValueError):
    """A validation set that cannot give a trustworthy threshold; the message says why and what to do."""


def check_validation_set(scores: ScoreSet, expect_defects: bool, min_good: int, min_defective: int) -> None:
    labels = scores.labels
    good, defective = int((labels == 0).sum()), int((labels == 1).sum())
    skipped = f" ({len(scores.skipped)} unreadable images skipped)" if scores.skipped else ""
    if good == 0:
        raise CalibrationRefused(f"validation set is all one class: no good images{skipped}; thresholds are set "
                                 "on good parts, give --val a folder of good images")
    if expect_defects and defective == 0:
        raise CalibrationRefused(f"validation set is all one class: the defect folder holds no defect images{skipped} "
                                 "(expected test/<defect>/ or one subfolder per defect class)")
    if good < min_good:
        raise CalibrationRefused(f"validation set too small: {good} good images{skipped}, at least {min_good} needed")
    if expect_defects and defective < min_defective:
        raise CalibrationRefused(
            f"validation set too small: {defective} defect images{skipped}, at least {min_defective} needed"
        )


def calibrate_scores(
    scores: ScoreSet,
    *,
    expect_defects: bool,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
    max_false_reject: float | None = None,
    min_good: int = MIN_GOOD,
    min_defective: int = MIN_DEFECTIVE,
) -> Calibration:
    """Thresholds and normalisation from validation scores; refuses (CalibrationRefused) an unusable set."""
    check_validation_set(scores, expect_defects, min_good, min_defective)
    labels, values = scores.labels, scores.scores
    good = values[labels == 0]
    has_defects = bool(labels.any())

    points: dict[str, OperatingPoint] = {}
    if has_defects:
        points["f1"] = operating_point("f1", f1_threshold(labels, values), labels, values)
    else:
        points["quantile"] = operating_point("quantile", quantile_threshold(good, quantile, margin), labels, values)
    if max_false_reject is not None:
        threshold = false_reject_threshold(good, max_false_reject)
        points["max_false_reject"] = operating_point("max_false_reject", threshold, labels, values)
    chosen = "max_false_reject" if max_false_reject is not None else next(iter(points))
    descriptions = {
        "f1": "F1-optimal split of good and defective validation scores",
        "quantile": f"p{quantile * 100:g} of good validation scores × {margin:g}",
        "max_false_reject": f"lowest threshold rejecting at most {max_false_reject or 0:.3%} of good validation images",
    }

    pixel_threshold, pixel = None, {}
    truth = scores.pixel_truth()
    if truth is not None:
        index, masks = truth
        pixel_threshold = f1_threshold(masks.ravel(), scores.maps[index].ravel())
        pixel = {"method": "F1-optimal over all pixels of the images with ground truth",
                 "images": len(index), "pixels": int(masks.size)}

    return Calibration(
        image_threshold=points[chosen].threshold,
        pixel_threshold=pixel_threshold,
        score_min=float(values.min()),
        score_max=float(values.max()),
        method=descriptions[chosen],
        details={
            "chosen": chosen,
            "points": {name: point.as_dict() for name, point in points.items()},
            "pixel": pixel,
            "validation": {
                "good": int((labels == 0).sum()),
                "defective": int(labels.sum()),
                "per_class": dict(Counter(scores.defects)),
                "skipped": scores.skipped,
            },
            "model_file": scores.model_file,
            "scores_checksum": scores.checksum,
            "calibrated": now_iso(),
        },
    )


def write_calibration(artifact: Artifact, calibration: Calibration) -> Manifest:
    """Store ``calibration`` in the artifact's manifest; write_manifest re-checksums every file."""
    return write_manifest(Path(artifact.folder), artifact.manifest.model_copy(update={"calibration": calibration}))


def validation_scores(
    artifact: Artifact,
    val_dir: str | Path | None = None,
    defects_dir: str | Path | None = None,
    scores_file: str | Path | None = None,
    precision: str = "fp32",
    progress: bool = False,
    **engine_options: object,
) -> ScoreSet:
    """Score the validation images with the runtime, or load scores saved earlier for this very model."""
    if scores_file is not None:
        scores = ScoreSet.load(scores_file)
        scores.check_scored_by(artifact, artifact.model_file(precision), str(scores_file))
        return scores
    if val_dir is None:
        raise ValueError("give the validation images (--val) or a saved scores file (--scores)")
    samples = good_samples(val_dir) + (defect_samples(defects_dir) if defects_dir is not None else [])
    inspector = Inspector(artifact, precision=precision, **engine_options)
    return score_samples(inspector, samples, progress)


def summary_lines(calibration: Calibration) -> list[str]:
    """What an engineer reads after calibrating: each operating point and which one the line will use."""
    details = calibration.details
    val = details["validation"]
    lines = [f"validation: {val['good']} good, {val['defective']} defective images "
             f"({', '.join(f'{k} {v}' for k, v in sorted(val['per_class'].items()))}); "
             f"{len(val['skipped'])} skipped"]
    lines.append(f"{'point':<18} {'threshold':>10} {'false reject':>13} {'false accept':>13} {'F1':>6}")
    for name, point in details["points"].items():
        far = "-" if point["false_accept_rate"] is None else f"{point['false_accept_rate']:.2%}"
        f1 = "-" if point["f1"] is None else f"{point['f1']:.3f}"
        mark = "  ← used" if name == details["chosen"] else ""
        lines.append(f"{name:<18} {point['threshold']:10.4f} {point['false_reject_rate']:13.2%} {far:>13} {f1:>6}{mark}")
    lines.append(f"image threshold {calibration.image_threshold:.4f} ({calibration.method}); normalised scores map "
                 f"it to 0.5, span [{calibration.score_min:.4f}, {calibration.score_max:.4f}]")
    if calibration.pixel_threshold is not None:
        lines.append(f"pixel threshold {calibration.pixel_threshold:.4f} ({details['pixel']['method']})")
    return lines


def parse_rate(text: str) -> float:
    """'0.5%' or '0.005' → 0.005."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (write e.g. 0.5% or 0.005)") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"rate {text!r} must be at least 0 and below 100%")
    return value

