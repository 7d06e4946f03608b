"""GPU benchmark (``patchline bench-gpu``): what the GPU path costs on the machine it runs on.

In one run on one GPU it measures:
- engine latency: a TensorRT engine call (copies included) at batch 1 and at the profile's largest batch;
- kernel latency: the fused distance kernel alone (device time, CUDA events) for one frame's
  patches and for a batch's, FP32 and FP16, and its rate in FLOP/s counted as the 2·n·m·d of
  the equivalent GEMM, next to cuBLAS's GEMM rate (through CuPy) for the same shapes, same run;
- end to end (Inspector: preprocess, engine, kernel, score): frame latency at batch 1 and
  batched throughput;
- the same model through ONNX Runtime's CUDA provider, for comparison.
A part that cannot run here (no TensorRT, no CuPy, no onnxruntime-gpu) is recorded with the
reason and the rest still runs. Results are written as JSON (default under bench/results/).
"""

from __future__ import annotations

import importlib
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from patchline.runtime.artifact import Artifact, load_artifact
from patchline.runtime.config import TensorRtConfig
from patchline.runtime.engines import EngineSettings, create_engine
from patchline.runtime.tools.bench import summarise, write_result

log = logging.getLogger(__name__)


def _summary(samples_ms: list[float]) -> dict[str, float]:
    # p90 rather than p95 for the few repeats a GPU run takes; 4 digits for kernels of tens of microseconds
    return summarise(samples_ms, (50, 90), digits=4)


def wall_times(call: Callable[[], object], repeats: int, warm: int = 3) -> list[float]:
    for _ in range(warm):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _rate(stats: dict[str, float], flops: float) -> dict[str, float]:
    return {**stats, "tflops": round(flops / (stats["median_ms"] * 1e-3) / 1e12, 3)}


def _part(results: dict[str, object], name: str, measure: Callable[[], object]) -> None:
    """Run one part of the benchmark; a failure is recorded with its reason instead of ending the run."""
    try:
        results[name] = measure()
    except Exception as exc:  # noqa: BLE001 - any missing library or driver problem is a result here
        log.warning("bench-gpu: %s not measured: %s", name, exc)
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}


def engine_latency(engine: Callable[[np.ndarray], np.ndarray], input_shape: tuple[int, ...], batches: list[int],
                   repeats: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    out: dict[str, object] = {}
    for batch in batches:
        x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
        out[f"batch_{batch}"] = _summary(wall_times(lambda: engine(x), repeats))
    return out


def gemm_rate(n: int, m: int, d: int, precision: str, repeats: int) -> dict[str, float]:
    """cuBLAS through CuPy: (n × d) @ (d × m), device time per product."""
    import cupy as cp

    dtype = cp.float16 if precision == "fp16" else cp.float32
    a = cp.random.standard_normal((n, d), dtype=cp.float32).astype(dtype)
    b = cp.random.standard_normal((d, m), dtype=cp.float32).astype(dtype)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(3):
        cp.matmul(a, b)
    times = []
    for _ in range(repeats):
        start.record()
        cp.matmul(a, b)
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return _rate(_summary(times), 2.0 * n * m * d)


def kernel_vs_gemm(bank: np.ndarray, query_counts: list[int], device: object, repeats: int,
                   cache_dir: str | None = None) -> dict[str, object]:
    from patchline.runtime.search.gpu_distance import GpuNearest

    rng = np.random.default_rng(1)
    m, d = bank.shape
    out: dict[str, object] = {"bank_rows": m, "dims": d}
    for precision in ("fp32", "fp16"):
        nearest = GpuNearest(bank, precision, device, cache_dir)
        for n in query_counts:
            x = rng.standard_normal((n, d), dtype=np.float32)
            entry: dict[str, object] = {
                "kernel_device": _rate(_summary(nearest.time_kernels(x, 1, repeats)), 2.0 * n * m * d),
                "call_with_copies": _summary(wall_times(lambda: nearest.nearest(x, 1), repeats)),
            }
            _part(entry, "cublas_gemm", lambda: gemm_rate(n, m, d, precision, repeats))
            gemm = entry["cublas_gemm"]
            if "tflops" in gemm:
                entry["kernel_over_gemm"] = round(entry["kernel_device"]["tflops"] / gemm["tflops"], 3)
            out[f"{precision}_queries_{n}"] = entry
        nearest.close()
    return out


def end_to_end(artifact: Artifact, engine: str, distance: str, batch: int, repeats: int,
               **engine_options: object) -> dict[str, object]:
    from patchline.runtime.inspector import Inspector

    inspector = Inspector(artifact, engine=engine, distance=distance, **engine_options)
    inspector.warm_up()
    height, width = inspector.preprocess.image_size
    image = np.random.default_rng(2).integers(0, 256, (height, width, 3), np.uint8)
    stages: dict[str, list[float]] = {}
    for _ in range(repeats):
        for stage, ms in inspector.inspect(image).timings_ms.items():
            stages.setdefault(stage, []).append(ms)
    batched = _summary(wall_times(lambda: inspector.inspect_batch([image] * batch), repeats))
    inspector.close()
    return {
        "frame_batch_1": {stage: _summary(ms) for stage, ms in stages.items()},
        f"batch_{batch}": {**batched, "images_per_s": round(batch / (batched["median_ms"] * 1e-3), 1)},
    }


# Where each library keeps its version string: pycuda has no __version__.
VERSION_ATTRIBUTES = {"tensorrt": "__version__", "pycuda": "VERSION_TEXT", "onnxruntime": "__version__",
                      "cupy": "__version__"}


def library_versions() -> dict[str, str]:
    """The versions of the libraries the GPU path uses; never raises (no GPU is needed to read them)."""
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name, attribute in VERSION_ATTRIBUTES.items():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # also a TensorRT whose libnvinfer is missing
            versions[name] = f"not importable ({exc})"
            continue
        versions[name] = str(getattr(module, attribute, f"unknown (no {name}.{attribute})"))
    return versions


def run_benchmark(artifact_dir: str | Path, repeats: int = 50, batch: int = 8, bank_rows: int | None = None,
                  settings: TensorRtConfig | None = None) -> dict[str, object]:
    """All parts on GPU 0; raises GpuUnavailable when there is no GPU at all."""
    from patchline.runtime.search.cuda_device import CudaDevice

    device = CudaDevice("cuda")
    artifact = load_artifact(artifact_dir)
    manifest = artifact.manifest
    settings = (settings or TensorRtConfig()).model_copy(update={"batch_profile": (1, 1, batch)})
    patches = manifest.model.patch_grid[0] * manifest.model.patch_grid[1]
    input_shape = (3, *manifest.preprocess.input_size)
    results: dict[str, object] = {
        "device": device.describe(),
        "versions": library_versions(),
        "model": {"model_id": manifest.model_id, "input": list(input_shape), "patches_per_image": patches,
                  "bank": list(artifact.bank.shape), "tensorrt_precision": settings.precision},
        "repeats": repeats,
    }

    def tensorrt_engine() -> dict[str, object]:
        engine = create_engine("tensorrt", artifact, EngineSettings(tensorrt=settings))
        measured = {"engine_file": engine.engine_file.name, **engine_latency(engine, input_shape, [1, batch], repeats)}
        engine.close()
        return measured

    def onnxruntime_cuda() -> dict[str, object]:
        engine = create_engine("onnxruntime", artifact, EngineSettings(device="cuda"))
        return engine_latency(engine, input_shape, [1, batch], repeats)

    _part(results, "engine_tensorrt", tensorrt_engine)
    _part(results, "engine_onnxruntime_cuda", onnxruntime_cuda)
    _part(results, "distance_kernel", lambda: kernel_vs_gemm(artifact.bank, [patches, patches * batch], device, repeats,
                                                             settings.cache_dir))
    if bank_rows:
        big_bank = np.random.default_rng(3).standard_normal((bank_rows, artifact.bank.shape[1]), dtype=np.float32)
        _part(results, f"distance_kernel_bank_{bank_rows}",
              lambda: kernel_vs_gemm(big_bank, [patches, patches * batch], device, repeats, settings.cache_dir))
    _part(results, "end_to_end_tensorrt", lambda: end_to_end(artifact, "tensorrt", "cuda", batch, repeats,
                                                             tensorrt=settings))
    _part(results, "end_to_end_onnxruntime_cuda", lambda: end_to_end(artifact, "onnxruntime", "cuda", batch, repeats,
                                                                     device="cuda"))
    return results


def write_results(results: dict[str, object], out_dir: str | Path) -> Path:
    """``out_dir/gpu-<host>-<UTC time>.json``."""
    return write_result("gpu", results, out_dir)
