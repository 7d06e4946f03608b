"""Which images a calibration or evaluation run uses, with their class and ground-truth mask.

Layouts understood:

- MVTec AD category: ``test/good/*``, ``test/<defect>/*`` and ``ground_truth/<defect>/<stem>_mask.png``;
- a plain folder of good images (searched recursively);
- a folder with one subfolder per defect class (no masks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from patchline.runtime.preprocess import is_mvtec_category, list_images

log = logging.getLogger("patchline.calibration")

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    path: Path
    defect: str  # "good" or the defect class
    mask: Path | None = None  # ground-truth mask; None for good images and for defects without one

    @property
    def label(self) -> int:
        return int(self.defect != GOOD)


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _mask_for(category: Path, defect: str, image: Path) -> Path | None:
    mask = category / "ground_truth" / defect / f"{image.stem}_mask.png"
    return mask if mask.is_file() else None


def mvtec_test_set(category: str | Path) -> list[Sample]:
    """Every image under ``CATEGORY/test/<class>/``, with its mask where ``ground_truth`` has one."""
    category = Path(category)
    if not is_mvtec_category(category):
        raise FileNotFoundError(f"{category}: no test/ folder (expected MVTec-AD layout test/<class>/*.png)")
    samples = []
    for folder in _class_folders(category / "test"):
        defect = folder.name
        for path in list_images(folder):
            mask = None if defect == GOOD else _mask_for(category, defect, path)
            samples.append(Sample(path, defect, mask))
    unmasked = sum(1 for s in samples if s.label and s.mask is None)
    if unmasked and (category / "ground_truth").is_dir():
        log.warning("%s: %d defect images have no ground_truth mask; pixel metrics leave them out", category, unmasked)
    return samples


def good_samples(folder: str | Path) -> list[Sample]:
    """Good images: an MVTec category's ``test/good`` (never ``train/``, which the model has seen), or a plain folder."""
    folder = Path(folder)
    root = folder / "test" / GOOD if is_mvtec_category(folder) else folder
    return [Sample(path, GOOD) for path in list_images(root)]


def defect_samples(folder: str | Path) -> list[Sample]:
    """Defective images: an MVTec category's ``test/<defect>/`` with masks, or one subfolder per defect class."""
    folder = Path(folder)
    if is_mvtec_category(folder):
        return [s for s in mvtec_test_set(folder) if s.label]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    return [Sample(path, sub.name) for sub in _class_folders(folder) if sub.name != GOOD for path in list_images(sub)]


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as bool (H, W), resized like the image the model sees (nearest, no new labels)."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{path}: not a readable mask image")
    height, width = size
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST) > 0
