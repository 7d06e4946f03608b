"""GPU engines: TensorRT (own package + pycuda) and ONNX Runtime's CUDA/TensorRT providers.

What needs no GPU runs everywhere: provider selection, the clear errors on a machine without
one, the FP16 graph conversion TensorRT 11 builds from, lazy imports, batched inspection.
The rest runs only where a GPU and the libraries are present, and skips saying which is missing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchline.runtime.artifact import load_artifact
from patchline.runtime.config import TensorRtConfig
from patchline.runtime.engines import EngineSettings, create_engine
from patchline.runtime.engines.engine_cache import EngineError
from patchline.runtime.engines.onnxruntime import OnnxRuntimeEngine, onnxruntime_providers
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import list_images, read_image
from patchline.runtime.search.cuda_device import GpuUnavailable, gpu_unavailable_reason

GPU_REASON = gpu_unavailable_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"no GPU here: {GPU_REASON}")
_TRT_MISSING = [r for r in (GPU_REASON and f"no GPU here: {GPU_REASON}",
                             importlib.util.find_spec("tensorrt") is None and "TensorRT's Python package is not installed")
                if r]
needs_tensorrt_gpu = pytest.mark.skipif(bool(_TRT_MISSING), reason="; ".join(_TRT_MISSING))


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def reference_batch(artifact) -> tuple[np.ndarray, np.ndarray]:
    """A batch of 3 and the CPU engine's embeddings for it."""
    height, width = artifact.manifest.preprocess.input_size  # the engine's input: after any centre crop
    batch = np.random.default_rng(0).standard_normal((3, 3, height, width), dtype=np.float32)
    return batch, OnnxRuntimeEngine(artifact, EngineSettings(device="cpu"))(batch)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- runs everywhere -------------------------------------------------------------------------------

def test_provider_selection(small_artifact, tmp_path) -> None:
    artifact = load_artifact(small_artifact)
    cpu, cuda, trt = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    assert onnxruntime_providers("auto", [cpu], artifact) == [cpu]
    assert onnxruntime_providers("auto", [trt, cuda, cpu], artifact) == [cuda, cpu]
    assert onnxruntime_providers("cpu", [trt, cuda, cpu], artifact) == [cpu]
    assert onnxruntime_providers("cuda", [cuda, cpu], artifact) == [cuda, cpu]
    settings = TensorRtConfig(precision="fp32", batch_profile=(1, 2, 8), cache_dir=str(tmp_path))
    (name, options), *rest = onnxruntime_providers("tensorrt", [trt, cuda, cpu], artifact, settings)
    assert (name, rest) == (trt, [cuda, cpu])
    assert options["trt_fp16_enable"] is False and options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == str(tmp_path / "onnxruntime-trt")
    assert (options["trt_profile_min_shapes"], options["trt_profile_max_shapes"]) == ("image:1x3x128x128",
                                                                                      "image:8x3x128x128")
    with pytest.raises(GpuUnavailable, match="needs onnxruntime-gpu"):
        onnxruntime_providers("cuda", [cpu], artifact)
    with pytest.raises(GpuUnavailable, match="TensorrtExecutionProvider"):
        onnxruntime_providers("tensorrt", [cuda, cpu], artifact)
    with pytest.raises(ValueError, match="expected one of auto, cpu, cuda, tensorrt"):
        onnxruntime_providers("gpu", [cpu], artifact)


@pytest.mark.skipif("CUDAExecutionProvider" in ort_providers(), reason="this onnxruntime has CUDA")
def test_onnxruntime_cuda_without_it_says_what_is_missing(small_artifact) -> None:
    with pytest.raises(GpuUnavailable, match="device 'cuda' needs onnxruntime-gpu"):
        Inspector(small_artifact, device="cuda")


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is present")
def test_gpu_parts_without_a_gpu_say_what_is_missing(small_artifact) -> None:
    with pytest.raises((GpuUnavailable, EngineError)):
        create_engine("tensorrt", load_artifact(small_artifact))
    with pytest.raises(GpuUnavailable):
        Inspector(small_artifact, device="cpu", distance="cuda")
    from patchline.runtime.cli import main

    for command in (["engine", "--artifact", str(small_artifact)], ["bench-gpu", "--artifact", str(small_artifact)]):
        with pytest.raises(SystemExit, match="patchline: (pycuda|the CUDA driver|CUDA device)"):
            main(command)


def test_tensorrt_engine_refuses_onnxruntime_model_files(small_artifact) -> None:
    """The INT8 ONNX model runs on ONNX Runtime only: asking TensorRT for it is a config error, found before any GPU use."""
    with pytest.raises(ValueError, match="for TensorRT keep precision fp32 and set tensorrt.precision: int8"):
        Inspector(small_artifact, engine="tensorrt", precision="int8", threads=2)
    with pytest.raises(ValueError, match="model file other.onnx runs on the onnxruntime engine"):
        Inspector(small_artifact, engine="tensorrt", model_file="other.onnx")
    with pytest.raises(ValueError, match="engine 'openvino': expected one of onnxruntime, tensorrt"):
        Inspector(small_artifact, engine="openvino")


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is present")
def test_tensorrt_inspector_with_cpu_threads_fails_only_on_the_missing_gpu(small_artifact) -> None:
    """The daemon passes threads= whatever the engine; TensorRT must not see it (a TypeError restart-loops the service)."""
    with pytest.raises((GpuUnavailable, EngineError)):
        Inspector(small_artifact, engine="tensorrt", threads=2)


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is present")
@pytest.mark.parametrize("gpu_part", [{"distance": "cuda"}, {"engine": "tensorrt"}])
def test_run_without_a_usable_gpu_exits_78_saying_why(small_artifact, tmp_path, gpu_part) -> None:
    """A GPU problem at start is one a restart cannot fix: EX_CONFIG, so systemd does not restart-loop."""
    from tests.test_daemon import finish, run_config, start_daemon

    config = run_config(tmp_path, small_artifact, 1883, {"kind": "folder", "path": str(tmp_path)}, threshold=1.0,
                        **gpu_part)
    code, output = finish(start_daemon(config))
    assert code == 78, output
    # Without the GPU's device nodes the daemon's device-node check (runtime/gpu_preflight.py) stops it first.
    nodes = Path("/dev/nvidiactl").exists() or Path("/dev/nvmap").exists()
    reason = "pycuda cannot be imported" if nodes else "GPU 0 cannot be used from this process: /dev/nvidiactl does not exist"
    assert f"cannot start: {reason}" in output and "Traceback" not in output, output


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_int8_calibration_without_tensorrt_says_what_is_missing(small_artifact, tmp_path) -> None:
    from patchline.calibration.tensorrt_calibrator import calibrate_engine

    settings = TensorRtConfig(precision="int8", calibration_cache=str(tmp_path / "calibration.cache"))
    with pytest.raises(EngineError, match="TensorRT's Python package cannot be imported.*'gpu' extra"):
        calibrate_engine(small_artifact, tmp_path, settings)


def test_gpu_libraries_are_imported_lazily() -> None:
    code = ("import sys\n"
            "import patchline.runtime.cli, patchline.runtime.engines, patchline.runtime.inspector\n"
            "import patchline.runtime.search, patchline.runtime.engines.trt_build\n"
            "import patchline.runtime.tools.bench_gpu\n"
            "print(sorted(m for m in ('tensorrt', 'pycuda', 'cupy', 'torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fp16_graph_for_tensorrt_11(small_artifact, tmp_path) -> None:
    """TensorRT 11 has no FP16 builder flag: the graph itself is converted, keeping FP32 inputs and outputs."""
    onnx = pytest.importorskip("onnx")  # the gpu extras install it; the runtime-only venv does not
    import onnxruntime as ort

    from patchline.runtime.engines.trt_build import convert_to_fp16

    artifact = load_artifact(small_artifact)
    target = tmp_path / "model_fp16.onnx"
    convert_to_fp16(artifact.model_path, target)
    model = onnx.load(str(target))
    assert {i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]} == {onnx.TensorProto.FLOAT}
    assert {t.data_type for t in model.graph.initializer if t.dims} == {onnx.TensorProto.FLOAT16}
    batch, want = reference_batch(artifact)
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"image": batch})[0]
    assert got.dtype == np.float32 and got.shape == want.shape
    assert relative_error(got, want) < 5e-3


def test_batched_inspection_equals_single(small_artifact, sample_data) -> None:
    inspector = Inspector(small_artifact, device="cpu")
    images = [read_image(p) for p in list_images(sample_data / "test")[:3]]
    batched = inspector.inspect_batch(images)
    for image, result in zip(images, batched):
        single = inspector.inspect(image)
        assert result.score == pytest.approx(single.score, rel=1e-5)
        assert result.location == single.location
        np.testing.assert_allclose(result.anomaly_map, single.anomaly_map, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="distance 'gpu'"):
        Inspector(small_artifact, device="cpu", distance="gpu")


# --- runs only with a GPU ----------------------------------------------------------------------------

@needs_tensorrt_gpu
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-3), ("fp16", 3e-2)])
def test_tensorrt_engine_matches_cpu(small_artifact, tmp_path, precision: str, tolerance: float) -> None:
    from patchline.runtime.engines.tensorrt import TensorRtEngine

    artifact = load_artifact(small_artifact)
    settings = TensorRtConfig(precision=precision, batch_profile=(2, 3, 4), cache_dir=str(tmp_path),
                              workspace_mb=512)
    engine = TensorRtEngine(artifact, EngineSettings(tensorrt=settings))
    assert engine.built and engine.engine_file.is_file() and engine.engine_file.with_suffix(".json").is_file()
    assert (engine.min_batch, engine.max_batch) == (2, 4)
    batch, want = reference_batch(artifact)
    for n in (1, 3):  # 1 is below the profile's min: run as 2 with a zero frame
        assert relative_error(engine(batch[:n]), want[:n]) < tolerance
    five = np.concatenate([batch, batch[:2]])  # more than the profile's max: split into 4 + 1 (run as 2)
    assert relative_error(engine(five), np.concatenate([want, want[:2]])) < tolerance
    engine.close()
    again = TensorRtEngine(artifact, EngineSettings(tensorrt=settings))
    assert not again.built and again.engine_file == engine.engine_file
    assert list(tmp_path.glob("sm*/timing_trt*.cache")), "the timing cache is kept"


@needs_tensorrt_gpu
def test_tensorrt_engine_refuses_to_build_when_disabled(small_artifact, tmp_path) -> None:
    from patchline.runtime.engines.tensorrt import TensorRtEngine

    settings = TensorRtConfig(cache_dir=str(tmp_path), build=False)
    with pytest.raises(EngineError, match="no engine has been built for it yet.*building is disabled"):
        TensorRtEngine(load_artifact(small_artifact), EngineSettings(tensorrt=settings))


@needs_tensorrt_gpu
def test_inspector_on_gpu_scores_like_cpu(small_artifact, sample_data, tmp_path) -> None:
    settings = TensorRtConfig(precision="fp32", cache_dir=str(tmp_path))
    gpu = Inspector(small_artifact, engine="tensorrt", distance="cuda", tensorrt=settings)
    assert gpu.distance.device is gpu.engine.gpu  # the kernel runs on the engine's GPU
    assert gpu.distance.cache_dir == tmp_path / "kernels"  # and caches its modules where the engines are
    cpu = Inspector(small_artifact, device="cpu")
    for path in list_images(sample_data / "test")[:4]:
        image = read_image(path)
        assert gpu.inspect(image).score == pytest.approx(cpu.inspect(image).score, rel=2e-3)


@needs_gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort_providers(), reason="onnxruntime-gpu is not installed")
def test_onnxruntime_cuda_matches_cpu(small_artifact) -> None:
    artifact = load_artifact(small_artifact)
    engine = OnnxRuntimeEngine(artifact, EngineSettings(device="cuda"))
    assert engine.providers[0] == "CUDAExecutionProvider"
    batch, want = reference_batch(artifact)
    assert relative_error(engine(batch), want) < 1e-3


@needs_gpu
@pytest.mark.skipif("TensorrtExecutionProvider" not in ort_providers(),
                    reason="this onnxruntime has no TensorRT execution provider")
def test_onnxruntime_tensorrt_provider_matches_cpu(small_artifact, tmp_path) -> None:
    artifact = load_artifact(small_artifact)
    engine = OnnxRuntimeEngine(artifact, EngineSettings(device="tensorrt", tensorrt=TensorRtConfig(cache_dir=str(tmp_path))))
    batch, want = reference_batch(artifact)
    assert relative_error(engine(batch), want) < 3e-2
    assert any((tmp_path / "onnxruntime-trt").iterdir()), "ONNX Runtime cached its TensorRT engine"


@needs_gpu
def test_bench_gpu_writes_results(small_artifact, tmp_path) -> None:
    from patchline.runtime.tools.bench_gpu import run_benchmark, write_results

    results = run_benchmark(small_artifact, repeats=3, batch=2,
                            settings=TensorRtConfig(cache_dir=str(tmp_path / "cache")))
    path = write_results(results, tmp_path / "results")
    assert path.is_file() and results["device"]["compute_capability"]
    kernel = results["distance_kernel"]
    patches = results["model"]["patches_per_image"]  # the first layer's grid: 32 × 32 for layer1 at 128 px
    assert kernel[f"fp32_queries_{patches}"]["kernel_device"]["tflops"] > 0
