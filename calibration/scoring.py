"""Score a list of samples with the runtime (never torch) and keep what calibration and evaluation need.

A ScoreSet can be saved and loaded again (``.npz``); it records which model produced it, and
loading it for a different artifact or model file is refused, since its scores would be meaningless.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from patchline.calibration.dataset import Sample, read_mask
from patchline.runtime.artifact import Artifact
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import ImageError, read_image

log = logging.getLogger("patchline.calibration")


class ScoreSetMismatch(ValueError):
    """Scores produced by another artifact or model than the one they are used with."""


@dataclass
class ScoreSet:
    samples: list[Sample]
    scores: np.ndarray  # (N,) raw image scores
    maps: np.ndarray  # (N, H, W) float32 anomaly maps at the model's input size
    latency_ms: np.ndarray  # (N,) per-frame time through the runtime, preprocessing included
    model_id: str
    model_file: str
    checksum: str  # Artifact.checksum of the model file that produced it
    skipped: list[str] = field(default_factory=list)  # "path: reason" of images that could not be read

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], np.int64)

    @property
    def defects(self) -> list[str]:
        return [s.defect for s in self.samples]

    def pixel_truth(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(indices, masks) of the samples with pixel ground truth: good images (all clear) and masked defects.

        None when no defect image has a mask, since pixel metrics then mean nothing.
        """
        if not any(s.mask for s in self.samples):
            return None
        size = self.maps.shape[1:]
        keep = [i for i, s in enumerate(self.samples) if s.mask or not s.label]
        masks = np.stack([read_mask(self.samples[i].mask, size) if self.samples[i].mask else np.zeros(size, bool)
                          for i in keep])
        return np.array(keep), masks

    def check_scored_by(self, artifact: Artifact, model_file: str, source: str) -> None:
        expected = artifact.checksum(model_file)
        if self.checksum != expected:
            raise ScoreSetMismatch(
                f"{source}: scores were produced by model {self.model_id} ({self.model_file}, checksum "
                f"{self.checksum[:12]}…), not by {artifact.folder} {model_file} (checksum {expected[:12]}…); "
                "score the images again with this artifact"
            )

    def save(self, path: str | Path) -> None:
        meta = {"model_id": self.model_id, "model_file": self.model_file, "checksum": self.checksum,
                "skipped": self.skipped}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:  # a handle, so numpy does not append .npz to the name
            np.savez(
                handle,
                meta=np.array(json.dumps(meta)),
                paths=np.array([str(s.path) for s in self.samples]),
                defects=np.array(self.defects),
                masks=np.array([str(s.mask or "") for s in self.samples]),
                scores=self.scores,
                maps=self.maps,
                latency_ms=self.latency_ms,
            )

    @classmethod
    def load(cls, path: str | Path) -> ScoreSet:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                samples = [Sample(Path(p), d, Path(m) if m else None)
                           for p, d, m in zip(data["paths"], data["defects"], data["masks"])]
                return cls(samples, data["scores"], data["maps"], data["latency_ms"], meta["model_id"],
                           meta["model_file"], meta["checksum"], meta["skipped"])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a patchline scores file ({exc})") from None


def score_samples(inspector: Inspector, samples: list[Sample], progress: bool = False) -> ScoreSet:
    """Score every readable sample; unreadable ones are logged and listed in ``skipped``."""
    kept, scores, maps, latency, skipped = [], [], [], [], []
    for sample in tqdm(samples, desc="scoring", unit="img", disable=not progress):
        try:
            rgb = read_image(sample.path)
        except ImageError as exc:
            skipped.append(str(exc))
            log.warning("skipped %s", exc)
            continue
        result = inspector.inspect(rgb)
        kept.append(sample)
        scores.append(result.score)
        maps.append(result.anomaly_map)
        latency.append(result.timings_ms["total"])
    height, width = inspector.preprocess.image_size
    return ScoreSet(
        samples=kept,
        scores=np.array(scores, np.float64),
        maps=np.stack(maps) if maps else np.zeros((0, height, width), np.float32),
        latency_ms=np.array(latency, np.float64),
        model_id=inspector.artifact.manifest.model_id,
        model_file=inspector.model_file,
        checksum=inspector.checksum,
        skipped=skipped,
    )
