"""Build a TensorRT engine from an artifact's ONNX on the GPU box that will run it.

TensorRT 8.6 (JetPack 6.0) and 10 (JetPack 6.1/6.2 ship 10.3) take the precision as builder
flags and INT8 from a calibrator; 8.6 also needs explicit batch asked for. TensorRT 11 builds
strongly typed networks only: FP16 comes from converting the ONNX graph to FP16 first, and INT8
would need symmetric int8 Q/DQ nodes in the graph, which patchline does not produce (its
model.int8.onnx has ONNX Runtime's uint8 activations with zero points), so INT8 is refused
there. TensorRT is imported inside functions.
"""

from __future__ import annotations

import importlib.metadata
import re
import time
from functools import cache
from pathlib import Path

from patchline.runtime.artifact import Artifact, sha256_file
from patchline.runtime.atomic_write import write_atomically
from patchline.runtime.config import TensorRtConfig
from patchline.runtime.engines.engine_cache import (EngineError, EngineKey, build_command, cache_directory, ensure_engine,
                                            gpu_tag)
from patchline.runtime.search.cuda_device import GpuUnavailable, driver_facts


def tensorrt_module():  # noqa: ANN201 - the tensorrt module
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(f"TensorRT's Python package cannot be imported ({exc}); install the 'gpu' extra "
                          "(pip install 'patchline[gpu]'), or JetPack's python3-libnvinfer on Jetson") from None
    return tensorrt


@cache
def trt_logger():  # noqa: ANN201 - a trt.Logger
    """The process's one TensorRT logger: TensorRT keeps the first it is given, for every builder and runtime."""
    trt = tensorrt_module()
    return trt.Logger(trt.Logger.WARNING)


def tensorrt_cuda_major(trt) -> str | None:  # noqa: ANN001
    """The CUDA major a pip-installed TensorRT was built for (tensorrt-cu12, tensorrt_cu13_bindings, ...)."""
    providers = importlib.metadata.packages_distributions()
    for module in (trt.__name__.partition(".")[0], "tensorrt_bindings", "tensorrt_libs"):
        for distribution in providers.get(module, []):
            found = re.search(r"cu(\d+)", distribution)
            if found:
                return found.group(1)
    return None


def construct(trt, factory):  # noqa: ANN001, ANN201 - trt.Builder or trt.Runtime
    """``factory(logger)``; TensorRT failing to start (pybind11's "factory function returned nullptr",
    typically a TensorRT built for a newer CUDA than the driver supports) becomes GpuUnavailable."""
    try:
        made, reason = factory(trt_logger()), "it returned nothing"
    except TypeError as exc:
        made, reason = None, str(exc)
    if made is None:
        major = tensorrt_cuda_major(trt)
        built_for = f", built for CUDA {major}," if major else ""
        raise GpuUnavailable(
            f"TensorRT {trt.__version__}{built_for} could not create its {factory.__name__} ({reason}); this box has "
            f"{driver_facts()}. TensorRT's log above says more; a TensorRT built for a newer CUDA than the driver "
            "supports cannot start: install the TensorRT build for the driver's CUDA major (tensorrt-cu12 or "
            "tensorrt-cu13) or update the driver")
    return made


def weakly_typed(trt) -> bool:  # noqa: ANN001
    """TensorRT 10 and older pick precisions from builder flags (and calibrate INT8 implicitly); 11 removed them."""
    return hasattr(trt.BuilderFlag, "FP16")


def require_int8_calibration(trt) -> None:  # noqa: ANN001
    """Refuse INT8 where TensorRT has no implicit (calibrated) INT8, before any of its INT8 API is touched."""
    if not weakly_typed(trt):
        raise EngineError(f"TensorRT {trt.__version__} builds only strongly typed networks: INT8 there needs an ONNX "
                          "with symmetric int8 Q/DQ nodes, and patchline's model.int8.onnx (uint8 activations with "
                          "zero points, for ONNX Runtime) is not one; use tensorrt.precision fp16, or TensorRT 8.6 or "
                          "10 (JetPack 6) for INT8")


def network_flags(trt) -> int:  # noqa: ANN001
    """TensorRT 8.x parses ONNX only into explicit-batch networks; 10 deprecated the flag and 11 removed it."""
    if int(trt.__version__.split(".")[0]) < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def engine_key(artifact: Artifact, settings: TensorRtConfig, tensorrt_version: str, device: object) -> EngineKey:
    """The key of ``artifact``'s engine built with ``settings`` by this TensorRT on ``device`` (a CudaDevice)."""
    calibration = None
    if settings.precision == "int8":
        if not settings.calibration_cache:
            raise EngineError("an INT8 engine needs tensorrt.calibration_cache: the file that "
                              "`patchline engine --calibrate IMAGES` writes")
        path = Path(settings.calibration_cache)
        if not path.is_file():
            raise EngineError(f"{path}: INT8 calibration cache does not exist; calibrate from images first with "
                              "`patchline engine --calibrate IMAGES` (tensorrt_calibrator.calibrate_engine)")
        calibration = sha256_file(path)
    return EngineKey(
        onnx_sha256=artifact.manifest.sha256[artifact.manifest.model.file],
        precision=settings.precision,
        batch_profile=settings.batch_profile,
        tensorrt=tensorrt_version,
        compute_capability=device.compute_capability,
        gpu=device.name,
        calibration_sha256=calibration,
    )


def convert_to_fp16(source: Path, target: Path) -> None:
    """An FP16 copy of an FP32 ONNX graph with FP32 inputs and outputs (what TensorRT 11 needs for FP16)."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise EngineError(f"an FP16 engine with TensorRT 11 converts the ONNX graph to FP16, which needs the onnx "
                          f"package ({exc}); install the 'gpu' extra") from None
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    # Synced: a copy that exists is used as it is, unchecked, by every later build (a build takes minutes anyway).
    write_atomically(target, model.SerializeToString(), fsync=True)


def _cache_calibrator(trt, cache: Path):  # noqa: ANN001, ANN202 - a trt.IInt8EntropyCalibrator2
    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        """Replays a calibration cache; it has no images, so TensorRT must accept the cache as it is."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache.read_bytes()

        def write_calibration_cache(self, data: bytes) -> None:
            pass

    return CacheCalibrator()


def _set_precision(trt, config, profile, settings: TensorRtConfig, calibrator: object | None) -> None:  # noqa: ANN001
    if settings.precision == "fp32":
        # FP32 means FP32: otherwise Ampere and later may run convolutions in TF32 (10-bit mantissa).
        config.clear_flag(trt.BuilderFlag.TF32)
    elif settings.precision == "fp16":
        if weakly_typed(trt):
            config.set_flag(trt.BuilderFlag.FP16)
    else:
        require_int8_calibration(trt)
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers without an INT8 kernel fall back to FP16, not FP32
        config.int8_calibrator = calibrator or _cache_calibrator(trt, Path(settings.calibration_cache))
        config.set_calibration_profile(profile)


def build_plan(onnx_path: Path, onnx_sha256: str, input_name: str, chw: tuple[int, int, int], settings: TensorRtConfig,
               work_dir: Path, calibrator: object | None = None) -> tuple[bytes, dict[str, object]]:
    """Serialised engine for ``onnx_path`` (input ``input_name`` of shape (N, *chw)) and facts about the build.

    ``onnx_sha256`` is the file's checksum from the manifest (checked when the artifact was loaded)."""
    trt = tensorrt_module()
    started = time.perf_counter()
    source = onnx_path
    if settings.precision == "fp16" and not weakly_typed(trt):
        source = work_dir / f"{onnx_sha256[:16]}_fp16.onnx"
        if not source.is_file():
            convert_to_fp16(onnx_path, source)
    builder = construct(trt, trt.Builder)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{source}: TensorRT's ONNX parser rejected the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    low, opt, high = settings.batch_profile
    profile.set_shape(input_name, (low, *chw), (opt, *chw), (high, *chw))
    config.add_optimization_profile(profile)
    _set_precision(trt, config, profile, settings, calibrator)
    timing = None
    if settings.timing_cache:
        # Kernel timings depend on the TensorRT version and the GPU: the engine cache's key says both.
        timing = work_dir / f"timing_trt{trt.__version__}.cache"
        cache = config.create_timing_cache(timing.read_bytes() if timing.is_file() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build a {settings.precision} engine (its log above says why)")
    if timing is not None:
        # Not synced: it only speeds builds up, and one that TensorRT does not take is replaced by a new one above.
        write_atomically(timing, bytes(config.get_timing_cache().serialize()), fsync=False)
    return bytes(plan), {"build_seconds": round(time.perf_counter() - started, 1), "workspace_mb": settings.workspace_mb,
                         "onnx_used": source.name}


def prepare_engine(artifact: Artifact, settings: TensorRtConfig, device: object,
                   calibrator: object | None = None) -> tuple[Path, bool]:
    """The cached engine for ``artifact`` on ``device`` (a CudaDevice), built now if missing or stale.

    Returns its path and whether it was built. With ``settings.build`` false a missing or stale
    engine raises EngineError saying why. An INT8 ``calibrator`` (calibration/tensorrt_calibrator.py)
    builds now: the calibration cache it writes during the build is part of the engine's key.
    """
    trt = tensorrt_module()
    if settings.precision == "int8":
        require_int8_calibration(trt)
    cache_dir = cache_directory(settings.cache_dir)
    manifest = artifact.manifest
    work_dir = cache_dir / gpu_tag(device.compute_capability, device.name)  # the timing cache is per GPU model
    work_dir.mkdir(exist_ok=True)

    def make_plan() -> tuple[bytes, dict[str, object]]:
        with device.active():
            plan, info = build_plan(artifact.model_path, manifest.sha256[manifest.model.file],
                                    manifest.preprocess.input_name, (3, *manifest.preprocess.input_size), settings,
                                    work_dir, calibrator)
        return plan, {**info, "gpu": device.name, "model_id": manifest.model_id}

    fix = build_command(artifact.folder, f"cuda:{device.index}", settings, cache_dir)
    if calibrator is None:
        key = engine_key(artifact, settings, trt.__version__, device)
        return ensure_engine(cache_dir, key, settings.build, make_plan, fix)
    built = make_plan()
    key = engine_key(artifact, settings, trt.__version__, device)
    return ensure_engine(cache_dir, key, True, lambda: built, fix)
