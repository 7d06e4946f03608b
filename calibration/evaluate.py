"""Score an MVTec-AD-layout test set with the runtime and measure how well scores separate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from patchline.runtime.inspector import Inspection, Inspector
from patchline.runtime.preprocess import list_images, read_image


@dataclass
class Scored:
    path: Path
    defect: str  # "good" or the defect folder's name
    inspection: Inspection

    @property
    def label(self) -> int:
        return int(self.defect != "good")


def score_test_set(inspector: Inspector, data_dir: str | Path) -> list[Scored]:
    """Every image under ``DATA/test/<class>/``, scored; class ``good`` is normal."""
    test = Path(data_dir) / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{data_dir}: no test/ folder (expected MVTec-AD layout test/<class>/*.png)")
    return [
        Scored(path, path.relative_to(test).parts[0], inspector.inspect(read_image(path)))
        for path in list_images(test)
    ]


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(set(labels.tolist())) < 2:
        raise ValueError("AUROC needs both good and defective images")
    return float(roc_auc_score(labels, scores))
