"""INT8 calibration of the TensorRT engine, fed by the same batches as the ONNX Runtime quantiser.

TensorRT 8.6 and 10 offer implicit INT8 calibration through ``IInt8EntropyCalibrator2`` (deprecated
since 10.1 in favour of explicit Q/DQ models; TensorRT 11 removed it and is refused here with the reason:
its Q/DQ models must be symmetric int8, which ``model.int8.onnx``, made for ONNX Runtime, is not).
``calibrate_engine`` calibrates from images while it builds the engine and writes the
calibration cache to ``tensorrt.calibration_cache``; later builds of that engine (a TensorRT
upgrade, another box of the same GPU) replay the cache instead of needing the images. tensorrt and
pycuda are imported only when calibrating.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from patchline.calibration.quantize import CalibrationBatches, calibration_images
from patchline.runtime.artifact import load_artifact
from patchline.runtime.atomic_write import write_atomically
from patchline.runtime.config import TensorRtConfig

log = logging.getLogger("patchline.calibration")


def entropy_calibrator(batches: CalibrationBatches, cache_file: str | Path, device: object):  # noqa: ANN201
    """A ``tensorrt.IInt8EntropyCalibrator2`` that copies each batch to ``device`` (a CudaDevice) and writes
    its cache to ``cache_file``. Its buffer lives in the device's primary context, the one engines are built in."""
    import pycuda.driver as cuda  # importable: ``device`` is a CudaDevice

    from patchline.runtime.engines.trt_build import require_int8_calibration, tensorrt_module

    trt = tensorrt_module()
    require_int8_calibration(trt)  # TensorRT 11 has no IInt8EntropyCalibrator2
    cache_file = Path(cache_file)
    height, width = batches.preprocess.input_size
    batch_bytes = batches.batch_size * 3 * height * width * np.dtype(np.float32).itemsize

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = iter(batches)
            with device.active():
                self.buffer = cuda.mem_alloc(batch_bytes)

        def get_batch_size(self) -> int:
            return batches.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self.batches, None)
            if batch is None or len(batch) < batches.batch_size:  # TensorRT reads exactly a full batch
                if batch is not None:
                    log.info("TensorRT calibration: last %d images left out (batches of %d)", len(batch), batches.batch_size)
                return None
            with device.active():
                cuda.memcpy_htod(self.buffer, np.ascontiguousarray(batch, np.float32))
            return [int(self.buffer)]

        def read_calibration_cache(self) -> None:
            return None  # always calibrate from the images: an existing cache is what is being replaced

        def write_calibration_cache(self, cache: bytes) -> None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(cache_file, bytes(cache), fsync=False)

    return EntropyCalibrator()


def calibrate_engine(
    artifact_dir: str | Path,
    images_dir: str | Path,
    settings: TensorRtConfig,
    device: str = "cuda",
    val_dir: str | Path | None = None,
    limit: int | None = 32,
) -> tuple[Path, bool]:
    """Calibrate and build the INT8 engine of an artifact on this GPU; write ``settings.calibration_cache``.

    Returns the engine's path and whether it was built now (False: the same calibration's engine was cached).
    Calibration runs at the profile's opt batch, as TensorRT feeds it.
    """
    from patchline.runtime.engines.trt_build import prepare_engine, require_int8_calibration, tensorrt_module
    from patchline.runtime.search.cuda_device import CudaDevice

    if settings.precision != "int8" or not settings.calibration_cache:
        raise ValueError("TensorRT calibration is for tensorrt.precision: int8 with tensorrt.calibration_cache set "
                         "to the file to write")
    require_int8_calibration(tensorrt_module())  # before any image is read or GPU touched
    artifact = load_artifact(artifact_dir)
    gpu = CudaDevice(device)
    paths = calibration_images(images_dir, val_dir, limit)
    batch = settings.batch_profile[1]
    if len(paths) < batch:
        raise ValueError(f"{images_dir}: {len(paths)} images, fewer than one calibration batch of {batch} "
                         "(tensorrt.batch_profile's opt)")
    batches = CalibrationBatches(artifact.manifest.preprocess.preprocessor(), paths, batch)
    calibrator = entropy_calibrator(batches, settings.calibration_cache, gpu)
    return prepare_engine(artifact, settings, gpu, calibrator)
