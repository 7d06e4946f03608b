"""Calibration and evaluation: thresholds, normalised scores, metrics and reports."""
