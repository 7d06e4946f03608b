"""One frame through the model: preprocess → engine → distance → score → anomaly map."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patchline.runtime.artifact import Artifact, load_artifact
from patchline.runtime.config import TensorRtConfig
from patchline.runtime.engine import accepted_options, create_engine
from patchline.runtime.score import MemoryBank, anomaly_map, image_score
from patchline.runtime.search import distance_backend
from patchline.runtime.search.bank_index import index_for_this_machine
from patchline.runtime.search.cuda_device import CudaDevice
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

    ``distance`` picks where patches meet the memory bank, a backend of runtime/search: "cpu" (numpy BLAS) or
    the CUDA kernel with the bank held on the GPU in FP32 ("cuda") or FP16 ("cuda-fp16"). ``precision``
    picks the artifact's fp32 model or its INT8 one (``patchline quantize``). ``search`` is the
    CPU's nearest-row search: "auto" (what the artifact's measurement chose, measured again at load
    when it was measured on another processor or core count), "pruned" or "plain"
    (score.MemoryBank); ``search_dims`` overrides the pruned search's projected directions.
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
        **engine_options: object,
    ) -> None:
        search_on = distance_backend(distance)  # an unknown name is refused before a model is loaded
        accepted = accepted_options(engine)
        if precision != "fp32" and "model_file" not in accepted:
            raise ValueError(f"precision {precision} runs the artifact's quantised ONNX model on the onnxruntime "
                             f"engine, not on {engine!r}; for TensorRT keep precision fp32 and set "
                             f"tensorrt.precision: {precision}")
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        manifest = self.artifact.manifest
        self.preprocess = manifest.preprocess.preprocessor()
        # An explicit model file (the benchmark's NAME@FILE variants) wins over the precision's.
        self.model_file = str(model_file or self.artifact.model_file(precision))
        if self.model_file != manifest.model.file:  # engines run the manifest's fp32 model unless told another file
            if "model_file" not in accepted:
                raise ValueError(f"model file {self.model_file} runs on the onnxruntime engine; engine {engine!r} "
                                 f"runs {manifest.model.file}")
            engine_options["model_file"] = self.model_file
        # CPU threads and the TensorRT settings go to the engines that have a use for them.
        for option, value in (("threads", threads), ("tensorrt", tensorrt)):
            if value is not None and option in accepted:
                engine_options[option] = value
        self.engine = create_engine(engine, self.artifact, **engine_options)
        self.checksum = self.artifact.checksum(self.model_file)  # the identity verdicts carry
        index = index_for_this_machine(self.artifact)
        self.bank = MemoryBank(self.artifact.bank, index, search_dims, approximate, threads, str(self.artifact.folder),
                               search)
        # A GPU search runs on the TensorRT engine's GPU (ONNX Runtime's CUDA provider uses GPU 0, the default)
        # and keeps its compiled kernels in the configured engine cache.
        gpu = getattr(self.engine, "device", None)
        self.distance = search_on(self.bank, gpu if isinstance(gpu, CudaDevice) else None,
                                  tensorrt and tensorrt.cache_dir)
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
