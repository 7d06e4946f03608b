"""Evaluate an artifact on an MVTec-AD-layout test set: the numbers that go into report.json.

Image AUROC, pixel AUROC and PRO (up to 30 % FPR, the MVTec protocol) over the whole set and
per defect type (that type's images against all good ones); with a calibration, the verdicts,
F1 and confusion counts at the calibrated threshold. Verdicts come from the runtime's
``decide`` so that they are the ones the line would give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from patchline.calibration.dataset import GOOD, mvtec_test_set
from patchline.calibration.metrics import PRO_FPR_LIMIT, au_pro, image_auroc, pixel_auroc
from patchline.calibration.report import write_report
from patchline.calibration.scoring import ScoreSet, score_samples
from patchline.calibration.thresholds import confusion
from patchline.runtime.artifact import INT8_KEY, load_artifact
from patchline.runtime.decision import Calibration, decide
from patchline.runtime.inspector import Inspector
from patchline.runtime.tools.bench import summarise


def _pixel_metrics(scores: ScoreSet, truth: tuple[np.ndarray, np.ndarray] | None, members: np.ndarray) -> dict:
    """Pixel AUROC and PRO over the images in ``members`` that have pixel ground truth."""
    if truth is None:
        return {"pixel_auroc": None, "pro": None}
    index, masks = truth
    keep = np.isin(index, members)
    if not masks[keep].any():
        return {"pixel_auroc": None, "pro": None}
    maps = scores.maps[index[keep]]
    return {"pixel_auroc": pixel_auroc(maps, masks[keep]), "pro": au_pro(maps, masks[keep], PRO_FPR_LIMIT)}


def _metrics(scores: ScoreSet, truth: tuple | None, members: np.ndarray, calibration: Calibration | None) -> dict:
    labels, values = scores.labels[members], scores.scores[members]
    result = {"images": int(len(members)), "good": int((labels == 0).sum()), "defective": int(labels.sum()),
              "image_auroc": image_auroc(labels, values), **_pixel_metrics(scores, truth, members)}
    if calibration is not None:
        counts = confusion(labels, values, calibration.image_threshold)
        result.update(f1=counts.f1, confusion=vars(counts),
                      detected=counts.true_ng / max(counts.true_ng + counts.false_ok, 1))
    return result


def evaluate(scores: ScoreSet, calibration: Calibration | None) -> dict:
    """Metrics over the whole set and per defect type, and every image's score and verdict."""
    labels = scores.labels
    if labels.min() == labels.max():
        raise ValueError("the test set is all one class: evaluation needs good and defective images")
    truth = scores.pixel_truth()
    report = {"overall": _metrics(scores, truth, np.arange(len(labels)), calibration), "per_defect": {}}
    for defect in sorted(set(scores.defects) - {GOOD}):
        members = np.array([i for i, d in enumerate(scores.defects) if d in (GOOD, defect)])
        report["per_defect"][defect] = _metrics(scores, truth, members, calibration)
    images = []
    for sample, score, latency in zip(scores.samples, scores.scores, scores.latency_ms):
        item = {"path": str(sample.path), "defect": sample.defect, "score": float(score), "latency_ms": float(latency)}
        if calibration is not None:
            decision = decide(float(score), calibration)
            item.update(normalised=decision.normalised, verdict=decision.verdict)
        images.append(item)
    report["images"] = images
    report["skipped"] = scores.skipped
    if calibration is not None:
        report["threshold"] = calibration.image_threshold
        report["pixel_threshold"] = calibration.pixel_threshold
        report["calibration_method"] = calibration.method
    return report


def compare_precisions(fp32: ScoreSet, int8: ScoreSet, calibration: Calibration | None) -> dict:
    """INT8 against fp32 on the same images: separation, score drift, verdict changes and per-frame latency."""
    if [s.path for s in fp32.samples] != [s.path for s in int8.samples]:
        raise ValueError("fp32 and int8 were scored on different images")
    drift = np.abs(int8.scores - fp32.scores)
    result = {
        "image_auroc": {"fp32": image_auroc(fp32.labels, fp32.scores), "int8": image_auroc(int8.labels, int8.scores)},
        "score_drift": {"max_abs": float(drift.max()), "mean_abs": float(drift.mean()),
                        "max_relative": float((drift / np.maximum(np.abs(fp32.scores), 1e-12)).max())},
        "latency_ms": {name: summarise(scored.latency_ms, unit="") for name, scored in (("fp32", fp32), ("int8", int8))},
        "int8_scores": [float(s) for s in int8.scores],
    }
    if calibration is not None:
        result["score_drift"]["max_normalised"] = float(drift.max() / calibration.span)
        result["verdict_changes"] = sum(decide(float(a), calibration).verdict != decide(float(b), calibration).verdict
                                        for a, b in zip(fp32.scores, int8.scores))
    return result


def evaluate_artifact(
    artifact_dir: str | Path,
    data_dir: str | Path,
    report_dir: str | Path,
    precision: str = "fp32",
    compare_int8: bool = True,
    progress: bool = False,
    **engine_options: object,
) -> dict:
    """Score the MVTec-layout test set with the runtime, evaluate, compare INT8 when there is one, write the report."""
    artifact = load_artifact(artifact_dir)
    calibration = artifact.manifest.calibration
    samples = mvtec_test_set(data_dir)

    def scored(which: str) -> ScoreSet:
        inspector = Inspector(artifact, precision=which, **engine_options)
        inspector.warm_up()  # the first frame pays for allocations; it would skew the latency figures
        return score_samples(inspector, samples, progress)

    scores = scored(precision)
    report = {"artifact": str(artifact_dir), "model_id": artifact.manifest.model_id, "data": str(data_dir),
              "precision": precision, "model_file": scores.model_file,
              "calibrated_on": calibration.details.get("model_file") if calibration else None,
              **evaluate(scores, calibration)}
    if compare_int8 and INT8_KEY in artifact.manifest.extra_files:
        other = scored("int8" if precision == "fp32" else "fp32")
        fp32, int8 = (scores, other) if precision == "fp32" else (other, scores)
        report["int8"] = compare_precisions(fp32, int8, calibration)
    write_report(report_dir, report, scores)
    return report
