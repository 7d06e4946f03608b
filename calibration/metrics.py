"""Separation metrics on scores and anomaly maps: image/pixel AUROC (scikit-learn) and the MVTec PRO."""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

PRO_FPR_LIMIT = 0.3  # the MVTec AD protocol integrates the PRO curve up to 30 % false-positive rate


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(set(np.asarray(labels).tolist())) < 2:
        raise ValueError("AUROC needs both good and defective images")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """AUROC over every pixel of the (N, H, W) anomaly maps against the bool ground-truth masks."""
    truth = masks.ravel()
    if truth.all() or not truth.any():
        raise ValueError("pixel AUROC needs both defect and defect-free pixels")
    return float(roc_auc_score(truth, maps.ravel()))


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap against false-positive rate, one point per distinct score, from (0, 0).

    At a threshold, PRO is the mean over every ground-truth region (8-connected component of
    a mask) of the fraction of its pixels scored above the threshold; the FPR counts pixels outside
    all regions. Sorting all pixels once gives every threshold's point (as MVTec's reference code).
    """
    fp_step = np.zeros(maps.size, np.float64)
    pro_step = np.zeros(maps.size, np.float64)
    regions = 0
    pixels = maps[0].size
    for i, mask in enumerate(masks):
        count, labelled = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += count - 1
        labelled = labelled.ravel()
        sizes = np.bincount(labelled, minlength=count).astype(np.float64)
        part = slice(i * pixels, (i + 1) * pixels)
        fp_step[part] = labelled == 0
        # each region adds up to 1 over its pixels, so the sum at a threshold is the regions' overlaps
        pro_step[part] = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
    negatives = fp_step.sum()
    if regions == 0 or negatives == 0:
        raise ValueError("PRO needs at least one ground-truth region and some defect-free pixels")
    order = np.argsort(-maps.ravel(), kind="stable")
    ordered = maps.ravel()[order]
    fpr = np.cumsum(fp_step[order]) / negatives
    pro = np.cumsum(pro_step[order]) / regions
    last_of_score = np.append(np.diff(ordered) != 0, True)  # equal scores fall together: one point
    fpr = np.concatenate([[0.0], np.clip(fpr[last_of_score], 0, 1)])
    pro = np.concatenate([[0.0], np.clip(pro[last_of_score], 0, 1)])
    return fpr, pro


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], x non-decreasing; y interpolated at the limit."""
    inside = int(np.searchsorted(x, limit, side="right"))
    area = float(np.trapezoid(y[:inside], x[:inside]))
    if inside < len(x) and x[inside - 1] < limit:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (limit - x0)
    return area


def au_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by the limit: 1.0 is perfect."""
    fpr, pro = pro_curve(maps, masks)
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit
