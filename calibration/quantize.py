"""INT8 static quantisation of an artifact's backbone with ONNX Runtime (QDQ format).

The calibration images go through the artifact's own Preprocessor, exactly as the runtime
feeds frames; ``CalibrationBatches`` is shared with the TensorRT calibrator. The result is
``model.int8.onnx`` beside the fp32 model plus ``quantization.json`` describing how it was
made, both recorded in the manifest's ``extra_files`` so that loading checks their sha256.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from patchline.runtime.artifact import INT8_KEY, INT8_MODEL_FILE, load_artifact, now_iso, write_manifest
from patchline.runtime.preprocess import ImageError, Preprocessor, evaluation_root, iter_images, list_images, training_root

if TYPE_CHECKING:
    from onnxruntime.quantization import CalibrationDataReader

log = logging.getLogger("patchline.calibration")

INFO_KEY = "int8_info"
INFO_FILE = "quantization.json"
# Quantising only the convolutions keeps pooling, resizing and concatenation of the patch
# embedding in float: they cost little, and the nearest-neighbour distances depend on them directly.
QUANTIZED_OPS = ("Conv",)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # ONNX Runtime's quantiser logs every graph edit at INFO on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def calibration_images(images_dir: str | Path, val_dir: str | Path | None = None, limit: int | None = None) -> list[Path]:
    """Images to calibrate with, at most ``limit`` spread evenly over them.

    ``images_dir``: the training images (an MVTec category's ``train/good``, or a folder).
    ``val_dir``: validation images, defects included (an MVTec category's ``test/``, or a folder):
    defects reach activation ranges that good images alone under-estimate, and the INT8 model
    clips what lies outside the calibrated ranges, squashing exactly the scores that matter.
    """
    roots = [training_root(images_dir)] + ([evaluation_root(val_dir)] if val_dir is not None else [])
    paths = [path for root in roots for path in list_images(root)]
    if not paths:
        raise ValueError(f"{', '.join(map(str, roots))}: no images to calibrate the quantisation with")
    if limit is not None and len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    return paths


class CalibrationBatches:
    """Preprocessed (B, 3, H, W) float32 batches of calibration images; iterable again and again.

    Unreadable images are skipped, logged and listed in ``skipped``; the last batch may be short.
    """

    def __init__(self, preprocess: Preprocessor, paths: list[Path], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
        self.preprocess = preprocess
        self.paths = list(paths)
        self.batch_size = batch_size
        self.skipped: list[str] = []

    def _images(self) -> Iterator[np.ndarray]:
        self.skipped = []
        for _, rgb in iter_images(self.paths):
            if isinstance(rgb, ImageError):
                self.skipped.append(str(rgb))
                log.warning("calibration: skipped %s", rgb)
            else:
                yield rgb

    def __iter__(self) -> Iterator[np.ndarray]:
        chunk: list[np.ndarray] = []
        for rgb in self._images():
            chunk.append(rgb)
            if len(chunk) == self.batch_size:
                yield self.preprocess(chunk)
                chunk = []
        if chunk:
            yield self.preprocess(chunk)


def ort_reader(batches: CalibrationBatches, input_name: str) -> CalibrationDataReader:
    """An onnxruntime CalibrationDataReader over ``batches`` (built here: the import needs onnx)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] | None = None

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.batches is None:
                self.batches = iter(batches)
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self.batches = None

    return Reader()


def quantize_int8(
    artifact_dir: str | Path,
    images_dir: str | Path,
    val_dir: str | Path | None = None,
    *,
    limit: int | None = 32,
    batch_size: int = 4,
    method: str = "minmax",
    per_channel: bool = True,
) -> Path:
    """Write ``model.int8.onnx`` into the artifact, record it in the manifest and return its path.

    ``images_dir``, ``val_dir``: training and validation images, see ``calibration_images``.
    ``method``: ONNX Runtime calibration method, "minmax", "entropy" or "percentile".
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(methods)}")
    artifact = load_artifact(artifact_dir)
    manifest = artifact.manifest
    paths = calibration_images(images_dir, val_dir, limit)
    batches = CalibrationBatches(manifest.preprocess.preprocessor(), paths, batch_size)
    out = artifact.file(INT8_MODEL_FILE)
    with tempfile.TemporaryDirectory(dir=artifact.folder) as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference + graph clean-up first, as ONNX Runtime recommends before static quantisation
        quant_pre_process(str(artifact.model_path), str(prepared))
        staged = Path(tmp) / INT8_MODEL_FILE
        try:
            quantize_static(
                str(prepared),
                str(staged),
                ort_reader(batches, manifest.preprocess.input_name),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
            )
        except ValueError:
            if len(batches.skipped) == len(paths):
                raise ValueError(f"none of the {len(paths)} calibration images could be read: "
                                 f"{'; '.join(batches.skipped[:3])}") from None
            raise
        staged.replace(out)
    used = len(paths) - len(batches.skipped)
    info = {
        "created": now_iso(),
        "source_model": manifest.model.file,
        "source_sha256": manifest.sha256[manifest.model.file],
        "format": "QDQ, activations uint8, weights int8" + (" per channel" if per_channel else ""),
        "quantized_ops": list(QUANTIZED_OPS),
        "calibration_method": method,
        "calibration_images": used,
        "calibration_skipped": batches.skipped,
        "calibration_source": [str(images_dir), *([str(val_dir)] if val_dir else [])],
        "onnxruntime": version("onnxruntime"),
    }
    artifact.file(INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    extra = {**manifest.extra_files, INT8_KEY: INT8_MODEL_FILE, INFO_KEY: INFO_FILE}
    write_manifest(artifact.folder, manifest.model_copy(update={"extra_files": extra}))
    log.info("INT8 model written to %s (%d calibration images, %s)", out, used, method)
    return out
