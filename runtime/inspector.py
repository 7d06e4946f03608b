"""One frame through the model: preprocess → engine → distance → score → anomaly map."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patchline.runtime.artifact import Artifact, load_artifact
from patchline.runtime.bank_index import SEARCH_DIMS, read_index
from patchline.runtime.engine import create_engine
from patchline.runtime.score import MemoryBank, anomaly_map, image_score


@dataclass
class Inspection:
    """The result for one image."""

    score: float
    anomaly_map: np.ndarray  # (H, W) at the model's input size
    location: tuple[int, int]  # (x, y) of the highest patch's centre, in the source image's pixels
    timings_ms: dict[str, float] = field(default_factory=dict)


class Inspector:
    """Scores RGB images with an artifact; one instance per camera/thread."""

    def __init__(
        self,
        artifact: Artifact | str | Path,
        engine: str = "onnxruntime",
        precision: str = "fp32",
        approximate: bool = False,
        search_dims: int = SEARCH_DIMS,
        **engine_options: object,
    ) -> None:
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        manifest = self.artifact.manifest
        self.preprocess = manifest.preprocess.preprocessor()
        self.precision = precision
        # An explicit model file (the benchmark's NAME@FILE variants) wins over the precision's.
        self.model_file = str(engine_options.get("model_file") or self.artifact.model_file(precision))
        if self.model_file != manifest.model.file:  # engines run the manifest's fp32 model unless told another file
            engine_options["model_file"] = self.model_file
        self.engine = create_engine(engine, self.artifact, **engine_options)
        threads = engine_options.get("threads")
        self.bank = MemoryBank(self.artifact.bank, read_index(self.artifact), search_dims, approximate, threads)
        self.num_neighbors = manifest.num_neighbors

    def warm_up(self) -> None:
        height, width = self.preprocess.image_size
        self.inspect(np.zeros((height, width, 3), np.uint8))

    def inspect(self, rgb: np.ndarray) -> Inspection:
        """Score one RGB uint8 image of any size."""
        clock = time.perf_counter
        t0 = clock()
        batch = self.preprocess([rgb])
        t1 = clock()
        embedding = self.engine(batch)[0]
        t2 = clock()
        h, w, dim = embedding.shape
        patches = embedding.reshape(h * w, dim)
        dist, idx = self.bank.nearest(patches, 1)
        t3 = clock()
        dist, idx = dist[:, 0], idx[:, 0]
        score, top = image_score(self.bank, patches, dist, idx, self.num_neighbors)
        t4 = clock()
        amap = anomaly_map(dist.reshape(h, w), self.preprocess.image_size)
        t5 = clock()
        row, col = divmod(top, w)
        src_h, src_w = rgb.shape[:2]
        location = (int((col + 0.5) * src_w / w), int((row + 0.5) * src_h / h))
        timings = {"preprocess": t1 - t0, "backbone": t2 - t1, "distance": t3 - t2, "reweight": t4 - t3, "map": t5 - t4}
        timings = {k: round(v * 1000.0, 3) for k, v in timings.items()}
        timings["total"] = round((t5 - t0) * 1000.0, 3)
        return Inspection(score=score, anomaly_map=amap, location=location, timings_ms=timings)
