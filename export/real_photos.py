"""A small MVTec-layout data set cut from real photographs: the ones scikit-image ships in its wheel.

Nothing here is drawn from a model of what a part looks like: every good sample is a crop of
a real photograph (coins, a printed page, the moon, a retina …), so the patch features, and the
memory bank fitted on them, have the statistics of real images. Samples take the photographs in
turn; each crop has its own position, scale, mirror and lighting. Defects are drawn on test
crops, each with its pixel mask::

    scratch   a thin bright or dark curved line
    stain     a soft-edged blot of colour
    patch     a square cut from another photograph of the set, pasted in

brick, gravel and grass are refused: they are kept out of everything patchline tunes on, for an
independent check. The same seed and scikit-image version give the same files.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from patchline.export.synthetic import Sample, write_mvtec

DEFECTS = ("scratch", "stain", "patch")
# skimage.data loaders of photographs bundled in the scikit-image wheel (no download).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    name: (lambda name=name: _skimage_data(name))
    for name in ("coins", "page", "text", "moon", "coffee", "immunohistochemistry", "retina", "microaneurysms",
                 "cell", "hubble_deep_field", "camera", "astronaut", "chelsea", "rocket")
}
PHOTOS["motorcycle_left"] = lambda: _skimage_data("stereo_motorcycle")[0]
ALIASES = {"ihc": "immunohistochemistry"}
RESERVED = ("brick", "gravel", "grass")  # an independent check: never generated here
DEFAULT_PHOTOS = ("coins", "page", "text", "moon", "coffee", "immunohistochemistry", "retina", "microaneurysms",
                  "motorcycle_left", "cell", "hubble_deep_field", "camera", "astronaut")


def _skimage_data(name: str) -> np.ndarray | tuple:
    try:
        from skimage import data
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the real-photo data set needs scikit-image (pip install 'patchline[bench]')",
                                  name=exc.name) from exc
    return getattr(data, name)()


def resolve_photos(names: Sequence[str]) -> list[str]:
    """Canonical photograph names; an unknown or reserved one is refused with the names that can be used."""
    resolved = []
    for name in names:
        canonical = ALIASES.get(name, name)
        if canonical in RESERVED:
            raise ValueError(f"photograph {name!r} is reserved for an independent check ({', '.join(RESERVED)} are "
                             "never used to make data here); choose others")
        if canonical not in PHOTOS:
            raise ValueError(f"unknown photograph {name!r}; choose from {', '.join(sorted({*PHOTOS, *ALIASES}))}")
        resolved.append(canonical)
    if not resolved:
        raise ValueError("no photographs given")
    return resolved


def load_photo(name: str) -> np.ndarray:
    """The photograph as 8-bit RGB (gray replicated, alpha dropped)."""
    image = np.asarray(PHOTOS[name]())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    """A random square crop (half to three quarters of the short side), maybe mirrored, at ``size`` px, float [0, 1]."""
    height, width = photo.shape[:2]
    side = int(min(height, width) * rng.uniform(0.5, 0.75))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    window = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        window = window[:, ::-1]
    shrink = cv2.INTER_AREA if side >= size else cv2.INTER_CUBIC
    crop = cv2.resize(np.ascontiguousarray(window), (size, size), interpolation=shrink).astype(np.float32) / 255.0
    return np.clip(crop * rng.uniform(0.92, 1.08) + rng.uniform(-0.03, 0.03), 0.0, 1.0)


def _scratch(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    start = rng.uniform(0.2, 0.8, 2) * size
    heading = rng.uniform(0, 2 * np.pi)
    points = [start]
    for _ in range(6):  # a gently bending line, 40–70 % of the crop long
        heading += rng.normal(0, 0.25)
        points.append(points[-1] + rng.uniform(0.07, 0.12) * size * np.array([np.cos(heading), np.sin(heading)]))
    mask = np.zeros((size, size), np.uint8)
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 255, max(2, size // 100), cv2.LINE_AA)
    mask = np.where(mask > 127, 255, 0).astype(np.uint8)
    image[mask > 0] = 0.95 if image[mask > 0].mean() < 0.5 else 0.05
    return mask


def _stain(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    blot = np.zeros((size, size), np.float32)
    centre = rng.uniform(0.25, 0.75, 2) * size
    axes = rng.uniform(0.05, 0.11, 2) * size
    cv2.ellipse(blot, tuple(np.round(centre).astype(int)), tuple(np.round(axes).astype(int)),
                float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(blot, (0, 0), size / 80) * 0.85
    colour = np.array([0.45, 0.25, 0.1], np.float32) * rng.uniform(0.7, 1.3)
    image[:] = image * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.where(alpha > 0.3, 255, 0).astype(np.uint8)


def _patch(rng: np.random.Generator, image: np.ndarray, donor: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    side = int(size * rng.uniform(0.12, 0.2))
    top, left = (int(v) for v in rng.integers(0, size - side, 2))
    src_top, src_left = (int(v) for v in rng.integers(0, size - side, 2))
    image[top : top + side, left : left + side] = donor[src_top : src_top + side, src_left : src_left + side]
    mask = np.zeros((size, size), np.uint8)
    mask[top : top + side, left : left + side] = 255
    return mask


def generate_real(out: str | Path, photos: Sequence[str] = DEFAULT_PHOTOS, train: int = 60, test_good: int = 10,
                  per_defect: int = 6, size: int = 256, seed: int = 0) -> Path:
    """Write the real-photo data set to ``out`` (MVTec layout) and return it; samples take ``photos`` in turn."""
    names = resolve_photos(photos)
    loaded = [load_photo(name) for name in names]
    rng = np.random.default_rng(seed)
    turn = itertools.count()

    def render_one(defect: str | None) -> Sample:
        i = next(turn)
        image = _crop(rng, loaded[i % len(loaded)], size)
        mask = np.zeros((size, size), np.uint8)
        if defect == "scratch":
            mask = _scratch(rng, image)
        elif defect == "stain":
            mask = _stain(rng, image)
        elif defect == "patch":
            other = loaded[(i + 1 + int(rng.integers(len(loaded) - 1))) % len(loaded)] if len(loaded) > 1 else loaded[0]
            mask = _patch(rng, image, _crop(rng, other, size))
        noisy = image + rng.normal(0, 0.01, image.shape).astype(np.float32)
        return (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8), mask

    return write_mvtec(out, render_one, DEFECTS, train, test_good, per_defect)
