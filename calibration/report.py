"""The evaluation report folder: report.json, the pictures people look at, and index.html showing them.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from patchline.calibration.dataset import GOOD, read_mask
from patchline.calibration.scoring import ScoreSet
from patchline.runtime.overlay import heatmap_overlay
from patchline.runtime.preprocess import read_image

REPORT = "report.json"
HISTOGRAM = "histogram.png"
ROC = "roc.png"
WORST = "worst_cases.png"
INDEX = "index.html"
WORST_PER_ROW = 5


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def histogram(scores: ScoreSet, threshold: float | None, path: Path) -> None:
    figure = Figure(figsize=(7, 4))
    ax = figure.add_subplot()
    labels = scores.labels
    bins = np.histogram_bin_edges(scores.scores, bins=min(40, max(10, len(labels) // 2)))
    ax.hist(scores.scores[labels == 0], bins=bins, alpha=0.6, color="tab:green", label=f"good ({(labels == 0).sum()})")
    ax.hist(scores.scores[labels == 1], bins=bins, alpha=0.6, color="tab:red", label=f"defective ({labels.sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4f}")
    ax.set_xlabel("raw anomaly score")
    ax.set_ylabel("images")
    ax.set_title("Score distribution: good vs defective")
    ax.legend()
    _save(figure, path)


def roc_figure(scores: ScoreSet, report: dict, path: Path, int8_scores: np.ndarray | None = None) -> None:
    figure = Figure(figsize=(5.5, 5.5))
    ax = figure.add_subplot()
    labels = scores.labels
    fpr, tpr, _ = roc_curve(labels, scores.scores)
    ax.plot(fpr, tpr, color="black", linewidth=2, label=f"all defects (AUROC {report['overall']['image_auroc']:.3f})")
    if int8_scores is not None:
        fpr8, tpr8, _ = roc_curve(labels, int8_scores)
        ax.plot(fpr8, tpr8, color="grey", linestyle=":", linewidth=2, label="all defects, INT8 model")
    defects = np.array(scores.defects)
    for defect, metrics in report["per_defect"].items():
        members = (defects == GOOD) | (defects == defect)
        fpr, tpr, _ = roc_curve(labels[members], scores.scores[members])
        ax.plot(fpr, tpr, linestyle="--", label=f"{defect} ({metrics['image_auroc']:.3f})")
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=1)
    ax.set_xlabel("false-positive rate (good rejected)")
    ax.set_ylabel("true-positive rate (defects caught)")
    ax.set_title("Image-level ROC")
    ax.legend(loc="lower right", fontsize=8)
    _save(figure, path)


def _tile(scores: ScoreSet, index: int, vmax: float) -> np.ndarray:
    sample = scores.samples[index]
    rgb = read_image(sample.path)
    tile = heatmap_overlay(rgb, scores.maps[index], vmax=vmax)
    if sample.mask is not None:  # ground truth outlined, so a missed region is visible
        mask = read_mask(sample.mask, rgb.shape[:2]).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(tile, contours, -1, (255, 255, 255), max(1, rgb.shape[0] // 128))
    return tile


def worst_cases(scores: ScoreSet, threshold: float | None, path: Path) -> dict[str, list[str]]:
    """Defects scored lowest (false accepts first) over good images scored highest (false rejects first)."""
    labels = scores.labels
    defective = np.flatnonzero(labels == 1)
    good = np.flatnonzero(labels == 0)
    rows = {
        "lowest-scored defects": defective[np.argsort(scores.scores[defective])][:WORST_PER_ROW],
        "highest-scored good parts": good[np.argsort(-scores.scores[good])][:WORST_PER_ROW],
    }
    shown = np.concatenate(list(rows.values()))
    vmax = float(scores.maps[shown].max())  # one colour scale for every tile, so tiles compare
    figure = Figure(figsize=(3 * WORST_PER_ROW, 6.6))
    listed = {}
    for r, (title, members) in enumerate(rows.items()):
        listed[title] = [str(scores.samples[i].path) for i in members]
        for c in range(WORST_PER_ROW):
            ax = figure.add_subplot(2, WORST_PER_ROW, r * WORST_PER_ROW + c + 1)
            ax.axis("off")
            if c >= len(members):
                continue
            i = members[c]
            ax.imshow(_tile(scores, i, vmax))
            sample, score = scores.samples[i], scores.scores[i]
            verdict = "" if threshold is None else (" NG" if score > threshold else " OK")
            wrong = threshold is not None and (score > threshold) != bool(sample.label)
            caption = f"{sample.defect}/{sample.path.name}\n{score:.4f}{verdict}"
            ax.set_title(("WRONG " if wrong else "") + caption, fontsize=8, color="red" if wrong else "black")
        figure.text(0.01, 0.96 - r * 0.48, title, fontsize=10, weight="bold")
    _save(figure, path)
    return listed


def _metric(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _metrics_rows(report: dict) -> str:
    rows = [("all", report["overall"]), *report["per_defect"].items()]
    out = []
    for name, m in rows:
        c = m.get("confusion")
        counts = f"{c['true_ng']} / {c['false_ok']} / {c['false_ng']} / {c['true_ok']}" if c else "–"
        out.append(f"<tr><td>{html.escape(name)}</td><td>{m['good']}</td><td>{m['defective']}</td>"
                   f"<td>{_metric(m['image_auroc'])}</td><td>{_metric(m['pixel_auroc'])}</td><td>{_metric(m['pro'])}</td>"
                   f"<td>{_metric(m.get('f1'))}</td><td>{counts}</td></tr>")
    return "\n".join(out)


def _int8_section(report: dict) -> str:
    int8 = report.get("int8")
    if not int8:
        return ""
    lat, auroc, drift = int8["latency_ms"], int8["image_auroc"], int8["score_drift"]
    return f"""<h2>INT8 vs fp32</h2>
<table><tr><th></th><th>fp32</th><th>int8</th></tr>
<tr><td>image AUROC</td><td>{auroc['fp32']:.4f}</td><td>{auroc['int8']:.4f}</td></tr>
<tr><td>latency per frame, median ms</td><td>{lat['fp32']['median']:.1f}</td><td>{lat['int8']['median']:.1f}</td></tr>
<tr><td>latency per frame, p95 ms</td><td>{lat['fp32']['p95']:.1f}</td><td>{lat['int8']['p95']:.1f}</td></tr></table>
<p>Score drift |int8 − fp32|: max {drift['max_abs']:.4g}, mean {drift['mean_abs']:.4g}
(max {drift['max_relative']:.2%} of the fp32 score); verdict changes: {int8.get('verdict_changes', '–')}.</p>"""


def write_index(report: dict, folder: Path) -> None:
    threshold = report.get("threshold")
    calibration = ("not calibrated: run <code>patchline calibrate</code> for verdicts" if threshold is None
                   else f"threshold {threshold:.4f} ({html.escape(report['calibration_method'])})")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>patchline evaluation: {html.escape(report['model_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}} img{{max-width:100%}}</style></head><body>
<h1>Evaluation of {html.escape(report['model_id'])}</h1>
<p>Data: {html.escape(report['data'])} · model file {html.escape(report['model_file'])} · {calibration} ·
{len(report['skipped'])} unreadable images skipped · <a href="{REPORT}">report.json</a></p>
<table><tr><th>set</th><th>good</th><th>defective</th><th>image AUROC</th><th>pixel AUROC</th>
<th>PRO (FPR ≤ 30%)</th><th>F1</th><th>caught / missed / false rejects / passed</th></tr>
{_metrics_rows(report)}</table>
{_int8_section(report)}
<h2>Scores</h2><img src="{HISTOGRAM}" alt="score histogram"> <img src="{ROC}" alt="ROC curve">
<h2>Hardest cases</h2><p>Top: defective parts with the lowest scores; bottom: good parts with the highest.
Heatmaps share one colour scale; white outlines are the ground truth.</p><img src="{WORST}" alt="worst cases">
</body></html>
"""
    (folder / INDEX).write_text(page)


def write_report(folder: str | Path, report: dict, scores: ScoreSet) -> Path:
    """Write report.json, the figures and index.html into ``folder``; return the index path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    threshold = report.get("threshold")
    int8 = report.get("int8")
    histogram(scores, threshold, folder / HISTOGRAM)
    roc_figure(scores, report, folder / ROC, np.array(int8["int8_scores"]) if int8 else None)
    report = {**report, "worst_cases": worst_cases(scores, threshold, folder / WORST)}
    (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    write_index(report, folder)
    return folder / INDEX
