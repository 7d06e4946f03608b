"""Threshold maths and PRO on constructed, hand-checked cases (no model involved)."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")  # the calibration extra: not in the runtime-only venv

from patchline.calibration.calibrate import CalibrationRefused, calibrate_scores, parse_rate
from patchline.calibration.dataset import Sample
from patchline.calibration.metrics import area_up_to, au_pro, pixel_auroc, pro_curve
from patchline.calibration.scoring import ScoreSet
from patchline.calibration.thresholds import (
    confusion,
    f1_threshold,
    false_reject_threshold,
    operating_point,
    quantile_threshold,
)
from patchline.runtime.decision import Calibration, decide


def score_set(good: list[float], defective: list[float]) -> ScoreSet:
    samples = [Sample(Path(f"good/{i}.png"), "good") for i in range(len(good))]
    samples += [Sample(Path(f"spot/{i}.png"), "spot") for i in range(len(defective))]
    n = len(samples)
    return ScoreSet(samples, np.array(good + defective, float), np.zeros((n, 4, 4), np.float32), np.zeros(n),
                    "m", "model.onnx", "c")


def test_f1_threshold_picks_best_split_midway():
    # splits (NG when score > t): >0.3 → TP 3 FP 1 FN 0, F1 6/7; >0.35 → F1 4/6; >0.4 → F1 4/5.
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.5, 0.6])
    t = f1_threshold(labels, scores)
    assert t == pytest.approx(0.325)
    point = operating_point("f1", t, labels, scores)
    assert point.confusion.true_ng == 3 and point.confusion.false_ng == 1 and point.confusion.false_ok == 0
    assert point.f1 == pytest.approx(6 / 7)
    assert point.false_reject_rate == pytest.approx(0.25) and point.false_accept_rate == 0.0


def test_f1_threshold_separable_and_inverted_sets():
    assert f1_threshold(np.array([0, 0, 0, 1, 1]), np.array([1.0, 2, 3, 5, 6])) == pytest.approx(4.0)
    # defects scored lowest: the best F1 (2/3) is to reject everything, so t lies just below the minimum
    labels, scores = np.array([0, 0, 1, 1]), np.array([5.0, 6, 1, 2])
    t = f1_threshold(labels, scores)
    assert t < 1.0 and confusion(labels, scores, t).true_ok == 0
    with pytest.raises(ValueError, match="both good and defective"):
        f1_threshold(np.array([0, 0]), np.array([1.0, 2]))


def test_f1_threshold_ties_take_the_lowest_cut():
    # NG from 1 up: TP 4, FP 4 → F1 8/16; NG from 10 up: TP 2, FN 2 → F1 4/8. Equal: anomalib keeps the
    # lower cut (the first maximum), so t sits between 0 and 1, not between 6 and 10.
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.0, 3, 4, 5, 6, 1, 2, 10, 11])
    assert f1_threshold(labels, scores) == pytest.approx(0.5)


def test_quantile_and_false_reject_thresholds():
    good = np.arange(1, 201, dtype=float)
    # p99.5 of 1..200 by linear interpolation: position 0.995 · 199 = 198.005 → 199.005
    assert quantile_threshold(good, 0.995, 1.1) == pytest.approx(199.005 * 1.1)
    hundred = np.arange(1, 101, dtype=float)
    assert false_reject_threshold(hundred, 0.05) == 95.0  # 96…100 rejected: exactly 5 %
    assert false_reject_threshold(hundred, 0.049) == 96.0  # 4 allowed
    assert false_reject_threshold(hundred, 0.0) == 100.0
    with pytest.raises(ValueError):
        false_reject_threshold(hundred, 1.0)
    assert parse_rate("0.5%") == pytest.approx(0.005) and parse_rate("0.02") == 0.02
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate("half")


def test_calibrate_scores_good_only_uses_quantile_and_normalises_threshold_to_half():
    good = [float(v) for v in np.linspace(1.0, 2.0, 20)]
    calibration = calibrate_scores(score_set(good, []), expect_defects=False, quantile=0.9, margin=1.2)
    assert calibration.details["chosen"] == "quantile"
    assert calibration.image_threshold == pytest.approx(np.quantile(good, 0.9) * 1.2)
    assert calibration.pixel_threshold is None
    assert (calibration.score_min, calibration.score_max) == (1.0, 2.0)
    decision = decide(calibration.image_threshold, calibration)
    assert decision.normalised == pytest.approx(0.5) and decision.verdict == "OK"
    assert decide(calibration.image_threshold + 1e-6, calibration).verdict == "NG"
    assert decide(100.0, calibration).normalised == 1.0 and decide(0.0, calibration).normalised == 0.0
    point = calibration.details["points"]["quantile"]
    assert point["false_reject_rate"] == 0.0 and point["false_accept_rate"] is None


def test_normalised_half_marks_the_threshold_in_use_when_the_config_overrides_it():
    calibration = Calibration(image_threshold=2.0, score_min=1.0, score_max=3.0, method="manual")
    decision = decide(2.5, calibration, threshold=3.0)
    assert decision.verdict == "OK" and decision.normalised == pytest.approx(0.25)  # span 2 kept, centred on 3
    assert decide(3.0, calibration, threshold=3.0).normalised == 0.5
    for score in (0.0, 1.9, 2.0, 2.5, 2.9999, 3.0, np.nextafter(3.0, 4.0), 3.5, 9.0):
        decision = decide(float(score), calibration, threshold=3.0)
        assert (decision.normalised > 0.5) == (decision.verdict == "NG"), score
    # a score above the threshold by less than 0.5's resolution still normalises above 0.5
    assert decide(np.nextafter(3.0, 4.0), Calibration(image_threshold=3.0, score_min=0.0, score_max=1e9,
                                                      method="manual")).normalised > 0.5


def test_calibrate_scores_with_defects_reports_both_points_and_uses_the_asked_one():
    good = [float(v) for v in range(1, 21)]  # 1…20
    bad = [15.5, 18.5, 25.0, 30.0, 40.0]
    scores = score_set(good, bad)
    f1_only = calibrate_scores(scores, expect_defects=True)
    assert f1_only.details["chosen"] == "f1"
    # >20 rejects 3 of 5 defects, no good: F1 0.75; >15 adds 2 defects and 5 good: F1 10/15; so 20 < t < 25
    assert f1_only.image_threshold == pytest.approx(22.5)
    both = calibrate_scores(scores, expect_defects=True, max_false_reject=0.1)
    assert set(both.details["points"]) == {"f1", "max_false_reject"}
    assert both.details["chosen"] == "max_false_reject"
    assert both.image_threshold == 18.0  # 19 and 20 rejected: 2 of 20 good = 10 %
    point = both.details["points"]["max_false_reject"]
    assert point["false_reject_rate"] == pytest.approx(0.1)
    assert point["confusion"] == {"true_ng": 4, "false_ng": 2, "true_ok": 18, "false_ok": 1}
    assert both.details["validation"]["per_class"] == {"good": 20, "spot": 5}


def test_calibrate_scores_refusals():
    ten_good = [float(v) for v in range(10)]
    with pytest.raises(CalibrationRefused, match="too small: 9 good images, at least 10"):
        calibrate_scores(score_set(ten_good[:9], []), expect_defects=False)
    with pytest.raises(CalibrationRefused, match="all one class: no good images"):
        calibrate_scores(score_set([], [1.0] * 12), expect_defects=True)
    with pytest.raises(CalibrationRefused, match="all one class: the defect folder holds no defect images"):
        calibrate_scores(score_set(ten_good, []), expect_defects=True)
    with pytest.raises(CalibrationRefused, match="too small: 4 defect images, at least 5"):
        calibrate_scores(score_set(ten_good, [20.0] * 4), expect_defects=True)


# One 2×4 map. Regions (8-connected): A = {(0,0), (0,1)}, B = {(1,3)}; 5 defect-free pixels.
PRO_MASK = np.array([[[1, 1, 0, 0], [0, 0, 0, 1]]], bool)
PRO_MAP = np.array([[[0.9, 0.5, 0.3, 0.1], [0.2, 0.4, 0.6, 0.8]]], np.float32)


def test_pro_curve_hand_computed():
    # descending: 0.9 (A) → PRO (½+0)/2; 0.8 (B) → ¾; 0.6 (ok) → FPR ⅕; 0.5 (A) → PRO 1; then FPR ⅖ … 1
    fpr, pro = pro_curve(PRO_MAP, PRO_MASK)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(pro, [0, 0.25, 0.75, 0.75, 1, 1, 1, 1, 1])
    # area up to FPR 0.3: 0.2 · 0.75 + 0.1 · 1 = 0.25 → normalised 0.25 / 0.3
    assert au_pro(PRO_MAP, PRO_MASK, 0.3) == pytest.approx(0.25 / 0.3)
    assert au_pro(PRO_MAP, PRO_MASK, 1.0) == pytest.approx(0.15 + 0.8)


def test_pro_ties_merge_into_one_point_and_limit_interpolates():
    tied = PRO_MAP.copy()
    tied[0, 1, 2] = tied[0, 0, 1] = 0.55  # the ok pixel and A's second pixel now cross together
    fpr, pro = pro_curve(tied, PRO_MASK)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(pro, [0, 0.25, 0.75, 1, 1, 1, 1, 1])
    # to 0.1: trapezoid from (0, 0.75) to (0.1, 0.875) = 0.08125
    assert au_pro(tied, PRO_MASK, 0.1) == pytest.approx(0.08125 / 0.1)
    assert au_pro(tied, PRO_MASK, 0.3) == pytest.approx((0.2 * 0.875 + 0.1) / 0.3)
    assert area_up_to(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5) == pytest.approx(0.125)


def test_pro_counts_good_images_as_false_positive_pixels_only():
    good_map = np.full((1, 2, 4), 0.7, np.float32)  # all above the 0.6 pixel: 8 more ok pixels
    maps = np.concatenate([PRO_MAP, good_map])
    masks = np.concatenate([PRO_MASK, np.zeros((1, 2, 4), bool)])
    fpr, pro = pro_curve(maps, masks)
    # 0.9 → ¼, 0.8 → ¾, 0.7 (8 ok pixels) → FPR 8/13, PRO ¾
    np.testing.assert_allclose(fpr[:4], [0, 0, 0, 8 / 13])
    np.testing.assert_allclose(pro[:4], [0, 0.25, 0.75, 0.75])
    assert pixel_auroc(PRO_MAP, PRO_MASK) == pytest.approx(14 / 15)  # 15 (region, ok) pairs; only 0.5 < 0.6 wrong
    with pytest.raises(ValueError, match="at least one ground-truth region"):
        pro_curve(good_map, np.zeros((1, 2, 4), bool))
