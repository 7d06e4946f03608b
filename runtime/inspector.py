"""One frame through the model: preprocess → engine → distance → score → anomaly map."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patchline.runtime.artifact import Artifact, load_artifact
from patchline.runtime.config import TensorRtConfig
from patchline.runtime.engines import EngineSettings, create_engine
from patchline.runtime.score import MemoryBank, anomaly_map, image_score
from patchline.runtime.search import DISTANCES
from patchline.runtime.search.bank_index import index_for_this_machine
from patchline.runtime.search.distance import NonFiniteError


@dataclass
class Inspection:
    """The result for one image."""

    score: float
    anomaly_map: np.ndarray  # (H, W) at the preprocessor's resize size
    location: tuple[int, int]  # (x, y) of the highest patch's centre, in the source image's pixels
    timings_ms: dict[str, float] = field(default_factory=dict)


def require_finite(values: np.ndarray, what: str) -> None:
    """Fail closed: NaN or infinity in any image's ``values`` (first axis: the image) raises NonFiniteError."""
    finite = np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
    if not finite.all():
        images = ", ".join(map(str, np.flatnonzero(~finite)))
        raise NonFiniteError(f"{what} of image {images} of the batch hold NaN or infinity: no score, no verdict")


class Inspector:
    """Scores RGB images with an artifact; one instance per camera/thread.

    ``engine`` names an engine of runtime/engines, made with the engine settings below (``device``,
    ``precision``, ``model_file``, ``threads``, ``graph_optimization``, ``tensorrt``: see EngineSettings).
    ``distance`` picks where patches meet the memory bank, a backend of runtime/search: "cpu" (numpy BLAS) or
    the CUDA kernel with the bank held on the GPU in FP32 ("cuda") or FP16 ("cuda-fp16"). ``search`` is the
    CPU's nearest-row search: "auto" (what the artifact's measurement chose, measured again at load
    when it was measured on another processor or core count), "pruned" or "plain"
    (score.MemoryBank); ``search_dims`` overrides the pruned search's projected directions. ``threads`` also
    bounds the CPU search's workers.
    """

    def __init__(
        self,
        artifact: Artifact | str | Path,
        engine: str = "onnxruntime",
        distance: str = "cpu",
        precision: str = "fp32",
        approximate: bool = False,
        search_dims: int | None = None,
        search: str = "auto",
        threads: int | None = None,
        model_file: str | None = None,
        tensorrt: TensorRtConfig | None = None,
        device: str = "auto",
        graph_optimization: str = "all",
    ) -> None:
        search_on = DISTANCES[distance]  # an unknown name is refused before a model is loaded
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        manifest = self.artifact.manifest
        self.preprocess = manifest.preprocess.preprocessor()
        settings = EngineSettings(device=device, precision=precision, model_file=model_file, threads=threads,
                                  graph_optimization=graph_optimization, tensorrt=tensorrt or TensorRtConfig())
        self.engine = create_engine(engine, self.artifact, settings)
        self.model_file = self.engine.model_file
        self.checksum = self.artifact.checksum(self.model_file)  # the identity verdicts carry
        index = index_for_this_machine(self.artifact)
        self.bank = MemoryBank(self.artifact.bank, index, search_dims, approximate, threads, str(self.artifact.folder),
                               search)
        # A GPU search runs on the engine's GPU where it holds one (else GPU 0, where ONNX Runtime's CUDA provider
        # runs) and keeps its compiled kernels in the configured engine cache.
        self.distance = search_on(self.bank, self.engine.gpu, settings.tensorrt.cache_dir)
        self.num_neighbors = manifest.num_neighbors

    def close(self) -> None:
        """Free the GPU memory of the engine and the distance kernel now, in their context (see CudaDevice)."""
        for part in (self.engine, self.distance):
            if hasattr(part, "close"):
                part.close()

    def warm_up(self) -> None:
        height, width = self.preprocess.image_size
        self.inspect(np.zeros((height, width, 3), np.uint8))

    def inspect(self, rgb: np.ndarray) -> Inspection:
        """Score one RGB uint8 image of any size."""
        return self.inspect_batch([rgb])[0]

    def inspect_batch(self, images: list[np.ndarray]) -> list[Inspection]:
        """Score RGB uint8 images as one batch; each result's timings_ms are those of the whole batch."""
        clock = time.perf_counter
        t0 = clock()
        batch = self.preprocess(images)
        t1 = clock()
        embeddings = self.engine(batch)
        t2 = clock()
        # An FP16 engine that overflows gives inf/NaN: refused here, naming the engine, before any search sees it.
        require_finite(embeddings, f"the {self.engine.name} engine's patch embeddings")
        count, h, w, dim = embeddings.shape
        patches = embeddings.reshape(count, h * w, dim)
        dist, idx = self.distance.nearest(patches.reshape(count * h * w, dim), 1)
        dist, idx = dist[:, 0].reshape(count, h * w), idx[:, 0].reshape(count, h * w)
        require_finite(dist, "the patch distances (a square beyond float32's range)")
        t3 = clock()
        crop_top, crop_left, in_h, in_w = self.preprocess.crop_box()
        size_h, size_w = self.preprocess.image_size
        reweight = amaps = 0.0
        scored = []
        for i, rgb in enumerate(images):
            t = clock()
            score, top = image_score(self.bank, patches[i], dist[i], idx[i], self.num_neighbors)
            reweight += clock() - t
            t = clock()
            amap = anomaly_map(dist[i].reshape(h, w), (in_h, in_w))
            if (in_h, in_w) != (size_h, size_w):  # a centre crop: the margin was not inspected (0)
                full = np.zeros((size_h, size_w), np.float32)
                full[crop_top : crop_top + in_h, crop_left : crop_left + in_w] = amap
                amap = full
            amaps += clock() - t
            row, col = divmod(top, w)
            src_h, src_w = rgb.shape[:2]
            location = (
                int((crop_left + (col + 0.5) * in_w / w) * src_w / size_w),
                int((crop_top + (row + 0.5) * in_h / h) * src_h / size_h),
            )
            scored.append((score, amap, location))
        t4 = clock()
        timings = {"preprocess": t1 - t0, "backbone": t2 - t1, "distance": t3 - t2, "reweight": reweight, "map": amaps}
        timings = {k: round(v * 1000.0, 3) for k, v in timings.items()}
        timings["total"] = round((t4 - t0) * 1000.0, 3)
        return [Inspection(score=s, anomaly_map=a, location=loc, timings_ms=dict(timings)) for s, a, loc in scored]
