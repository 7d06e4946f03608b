"""The real GPU libraries' Python side, checked where there is no GPU.

- pycuda: the benchmark's machine facts read its version from the real package (its top-level
  module is plain Python, so the sdist's copy imports without CUDA).
- TensorRT 8.6 (JetPack 6.0), 10 (CUDA 12 wheels) and 11 (CUDA 13 wheels): the real bindings
  import once the libraries they link are satisfied by stubs built here with gcc, whose
  factories return NULL as a libnvinfer that cannot start does. tests/trt_surface.py then checks
  every TensorRT attribute, enum member and method patchline uses against them, and that
  construction failures and INT8 on TensorRT 11 become patchline's clear errors.

The files come from PyPI through pip (tests/pypi.py) into pytest's cache folder.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pypi import fetch, unpack

ROOT = Path(__file__).resolve().parent.parent
PYCUDA = "pycuda==2025.1.2"
# major: (the bindings' wheel, patchline's guards on it, the CUDA major the wheel's name says)
BINDINGS = {
    "8.6": ("tensorrt-bindings==8.6.1", {"weakly_typed": True, "explicit_batch": True}, None),
    "10": ("tensorrt-cu12-bindings==10.3.0", {"weakly_typed": True, "explicit_batch": False}, "12"),
    "11": ("tensorrt-cu13-bindings==11.4.0.106", {"weakly_typed": False, "explicit_batch": False}, "13"),
}
DRIVER_CUDA = 12020  # what the stub libcuda.so.1 reports: CUDA 12.2
# Uses the scan must find, so that a scan that silently found nothing cannot pass.
CORE_USES = {"trt.OnnxParser", "trt.MemoryPoolType.WORKSPACE", "Builder.create_network",
             "Builder.build_serialized_network", "OnnxParser.parse_from_file", "IBuilderConfig.set_memory_pool_limit",
             "ITimingCache.serialize", "Runtime.deserialize_cuda_engine", "ICudaEngine.get_tensor_profile_shape",
             "IExecutionContext.execute_async_v3", "IExecutionContext.set_tensor_address"}


@pytest.fixture(scope="module")
def pypi_cache(request, tmp_path_factory) -> Path:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider: download each run
    return cache.mkdir("pypi") if cache is not None else tmp_path_factory.mktemp("pypi")


def test_bench_reads_the_real_pycuda_version(pypi_cache, tmp_path) -> None:
    """pycuda has no __version__ (bench-gpu crashed on it before measuring anything): VERSION_TEXT."""
    import onnxruntime

    source = unpack(fetch(PYCUDA, pypi_cache, binary=False), tmp_path / "pycuda")
    code = "import json; from patchline.runtime.tools.bench_gpu import library_versions; print(json.dumps(library_versions()))"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(source)},
                            capture_output=True, text=True, check=True)
    versions = json.loads(result.stdout)
    assert versions["pycuda"] == PYCUDA.split("==")[1]
    assert versions["onnxruntime"] == onnxruntime.__version__
    assert versions["tensorrt"].startswith("not importable")


def build_stubs(extension: Path, folder: Path) -> None:
    """A stub for each NVIDIA library ``extension`` links, defining every symbol it needs that this process
    does not already have (Python's C API, libc), each returning NULL/0; and a libcuda.so.1 that reports
    CUDA 12.2, for the error messages' driver facts."""
    if shutil.which("gcc") is None or shutil.which("readelf") is None:
        pytest.fail("gcc and binutils (readelf, nm) are needed to build the stub libraries")
    dynamic = subprocess.run(["readelf", "-d", str(extension)], capture_output=True, text=True, check=True).stdout
    libraries = re.findall(r"\(NEEDED\)\s+Shared library: \[(libnv\S+)\]", dynamic)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(extension)], capture_output=True, text=True,
                               check=True).stdout
    here = ctypes.CDLL(None)
    symbols = [parts[1] for parts in map(str.split, undefined.splitlines())
               if len(parts) == 2 and parts[0] == "U" and "@" not in parts[1] and not hasattr(here, parts[1])]
    assert libraries and "createInferBuilder_INTERNAL" in symbols, (libraries, symbols)
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "stub.c"
    # asm labels give C functions the (possibly C++-mangled) names the bindings look for.
    source.write_text("".join(f'void *stub{i}(void) __asm__("{name}");\nvoid *stub{i}(void) {{ return 0; }}\n'
                              for i, name in enumerate(symbols)))
    for library in libraries:
        subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{library}", "-o", str(folder / library), str(source)],
                       check=True)
    cuda = folder / "libcuda.c"
    cuda.write_text(f"int cuDriverGetVersion(int *version) {{ *version = {DRIVER_CUDA}; return 0; }}\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(cuda)], check=True)


@pytest.mark.parametrize("major", list(BINDINGS))
def test_tensorrt_api_surface(major: str, pypi_cache, tmp_path) -> None:
    requirement, guards, cuda_major = BINDINGS[major]
    bindings = unpack(fetch(requirement, pypi_cache), tmp_path / "bindings")
    build_stubs(bindings / "tensorrt_bindings" / "tensorrt.so", tmp_path / "stubs")
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path / "stubs")}
    result = subprocess.run([sys.executable, "-m", "tests.trt_surface", str(bindings)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    version = requirement.split("==")[1]
    assert version.startswith(report["version"]) and report["version"].startswith(major)
    assert report["problems"] == []
    assert report["guards"] == guards
    assert CORE_USES <= set(report["uses"])
    if not guards["weakly_typed"]:
        assert {"trt.BuilderFlag.FP16", "trt.IInt8EntropyCalibrator2", "IBuilderConfig.int8_calibrator"} <= set(
            report["guarded_absent"])
    else:
        assert report["guarded_absent"] == []

    # TensorRT that cannot start: pybind11's TypeError becomes GpuUnavailable naming both CUDA versions.
    for kind in ("Builder", "Runtime"):
        error = report[kind.lower()]
        assert error is not None and error["type"] == "GpuUnavailable", error
        message = error["message"]
        assert f"TensorRT {report['version']}" in message and f"could not create its {kind}" in message
        assert "factory function returned nullptr" in message and "supporting CUDA up to 12.2" in message
        assert (f"built for CUDA {cuda_major}" in message) == (cuda_major is not None), message

    refusal = report["int8_calibration"]
    if guards["weakly_typed"]:  # past the TensorRT check, to the missing artifact
        assert refusal["type"] == "ArtifactError", refusal
    else:
        assert refusal["type"] == "EngineError" and "strongly typed" in refusal["message"], refusal
