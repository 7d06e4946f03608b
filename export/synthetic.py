"""A small synthetic inspection data set in MVTec-AD layout, generated locally.

A textured part with a printed label; good samples vary in position, lighting and
noise; defects are scratches, spots and missing print, each with a pixel mask::

    OUT/train/good/*.png
    OUT/test/good/*.png          OUT/test/<defect>/*.png
    OUT/ground_truth/<defect>/*_mask.png
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from patchline.runtime.overlay import write_rgb

DEFECTS = ("scratch", "spot", "missing_print")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed-metal-like texture in [0, 1]: oriented gratings plus smoothed noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    grating = 0.5 + 0.12 * np.sin(2 * np.pi * (24 * x + 3 * y)) + 0.06 * np.sin(2 * np.pi * 57 * y)
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.5)
    return np.clip(grating + 0.08 * noise, 0, 1)


def render(rng: np.random.Generator, size: int = 256, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image and its defect mask (all zero for a good part)."""
    texture = _texture(rng, size)
    image = np.empty((size, size, 3), np.float32)
    background = np.array([0.18, 0.2, 0.24], np.float32)
    part_colour = np.array([0.62, 0.64, 0.68], np.float32) * rng.uniform(0.95, 1.05)
    image[:] = background
    shift = rng.integers(-4, 5, 2)
    centre = (size // 2 + int(shift[0]), size // 2 + int(shift[1]))
    part = np.zeros((size, size), np.uint8)
    half = int(size * 0.36)
    cv2.rectangle(part, (centre[0] - half, centre[1] - half), (centre[0] + half, centre[1] + half), 255, -1)
    part_mask = part > 0
    image[part_mask] = part_colour * (0.75 + 0.5 * texture[part_mask, None])

    # Printed label: a ring and a code, dark ink.
    ink = np.zeros((size, size), np.uint8)
    scale = size / 256
    cv2.circle(ink, (centre[0], centre[1] - int(30 * scale)), int(22 * scale), 255, max(1, int(4 * scale)))
    cv2.putText(ink, "PL-07", (centre[0] - int(52 * scale), centre[1] + int(40 * scale)),
                cv2.FONT_HERSHEY_SIMPLEX, 1.1 * scale, 255, max(1, int(3 * scale)), cv2.LINE_AA)
    mask = np.zeros((size, size), np.uint8)
    if defect == "missing_print":
        ys, xs = np.nonzero(ink)
        pick = rng.integers(len(xs))
        box = int(rng.integers(18, 30) * scale)
        x0, y0 = int(xs[pick]) - box // 2, int(ys[pick]) - box // 2
        region = np.zeros_like(ink)
        region[max(y0, 0) : y0 + box, max(x0, 0) : x0 + box] = 255
        removed = cv2.bitwise_and(ink, region)
        ink = cv2.subtract(ink, removed)
        mask = cv2.dilate((removed > 0).astype(np.uint8) * 255, np.ones((3, 3), np.uint8))
    alpha = ink.astype(np.float32)[..., None] / 255
    image = image * (1 - alpha) + np.array([0.08, 0.08, 0.1], np.float32) * alpha

    if defect == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(40, 90) * scale
        cx, cy = centre[0] + rng.integers(-half // 2, half // 2), centre[1] + rng.integers(-half // 2, half // 2)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        p0, p1 = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
        cv2.line(mask, p0, p1, 255, max(2, int(3 * scale)))
        shade = np.array([0.95, 0.95, 0.92] if rng.random() < 0.5 else [0.1, 0.1, 0.1], np.float32)
        image[mask > 0] = shade
    elif defect == "spot":
        radius = int(rng.integers(6, 13) * scale)
        cx, cy = centre[0] + rng.integers(-half + radius, half - radius), centre[1] + rng.integers(-half + radius, half - radius)
        cv2.circle(mask, (int(cx), int(cy)), radius, 255, -1)
        image[mask > 0] = np.array([0.45, 0.25, 0.12], np.float32) * rng.uniform(0.8, 1.2)

    gain = rng.uniform(0.93, 1.07)
    image = image * gain + rng.normal(0, 0.012, image.shape).astype(np.float32)
    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return rgb, mask


Sample = tuple[np.ndarray, np.ndarray]  # an RGB image and its defect mask (all zero for a good part)


def write_mvtec(root: str | Path, render_one: Callable[[str | None], Sample], defects: tuple[str, ...], train: int,
                test_good: int, per_defect: int) -> Path:
    """Write ``render_one(None)`` good samples and ``render_one(defect)`` defective ones in MVTec layout."""
    root = Path(root)
    for i in range(train):
        write_rgb(root / "train" / "good" / f"{i:03d}.png", render_one(None)[0])
    for i in range(test_good):
        write_rgb(root / "test" / "good" / f"{i:03d}.png", render_one(None)[0])
    for defect in defects:
        for i in range(per_defect):
            rgb, mask = render_one(defect)
            write_rgb(root / "test" / defect / f"{i:03d}.png", rgb)
            (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "ground_truth" / defect / f"{i:03d}_mask.png"), mask)
    return root


def generate(out: str | Path, train: int = 40, test_good: int = 10, per_defect: int = 6, size: int = 256, seed: int = 0) -> Path:
    """Write the data set to ``out`` (MVTec layout) and return it."""
    rng = np.random.default_rng(seed)
    return write_mvtec(out, lambda defect: render(rng, size, defect), DEFECTS, train, test_good, per_defect)
