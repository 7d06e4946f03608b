"""TensorRT INT8 entropy calibrator fed by the same batches as the ONNX Runtime quantiser.

TensorRT 10 still offers implicit INT8 calibration through ``IInt8EntropyCalibrator2`` (deprecated
since 10.1 in favour of explicit Q/DQ models, such as ``model.int8.onnx``, which TensorRT also
builds). The calibration cache is written next to the engine, so a rebuild on the same box skips
calibration. tensorrt and pycuda are imported only when a calibrator is made.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from patchline.calibration.quantize import CalibrationBatches, calibration_images
from patchline.runtime.artifact import load_artifact

log = logging.getLogger("patchline.calibration")

CACHE_SUFFIX = ".calib"


def cache_path(engine_path: str | Path) -> Path:
    """Where the calibration cache of an engine lives: beside it, ``model.plan`` → ``model.calib``."""
    return Path(engine_path).with_suffix(CACHE_SUFFIX)


def entropy_calibrator(batches: CalibrationBatches, cache_file: str | Path):
    """A ``tensorrt.IInt8EntropyCalibrator2`` that copies each batch to the GPU and keeps the cache in ``cache_file``."""
    import pycuda.autoinit  # noqa: F401  (creates the CUDA context the copies need)
    import pycuda.driver as cuda
    import tensorrt as trt

    cache_file = Path(cache_file)
    height, width = batches.preprocess.image_size
    batch_bytes = batches.batch_size * 3 * height * width * np.dtype(np.float32).itemsize

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = iter(batches)
            self.device = cuda.mem_alloc(batch_bytes)

        def get_batch_size(self) -> int:
            return batches.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self.batches, None)
            if batch is None or len(batch) < batches.batch_size:  # TensorRT reads exactly a full batch
                if batch is not None:
                    log.info("TensorRT calibration: last %d images left out (batches of %d)", len(batch), batches.batch_size)
                return None
            cuda.memcpy_htod(self.device, np.ascontiguousarray(batch, np.float32))
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: bytes) -> None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_bytes(bytes(cache))

    return EntropyCalibrator()


def artifact_calibrator(
    artifact_dir: str | Path,
    images_dir: str | Path,
    engine_path: str | Path,
    val_dir: str | Path | None = None,
    batch_size: int = 4,
    limit: int | None = 32,
):
    """The calibrator for an artifact's engine: its images, its preprocessing, the cache beside ``engine_path``."""
    artifact = load_artifact(artifact_dir)
    paths = calibration_images(images_dir, val_dir, limit)
    batches = CalibrationBatches(artifact.manifest.preprocess.preprocessor(), paths, batch_size)
    return entropy_calibrator(batches, cache_path(engine_path))
