"""What each install of patchline brings, read from the installed project's metadata (no network), and
the runtime's refusal of an environment with no ONNX Runtime or two of them."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from patchline.runtime.engines.onnxruntime import ORT_DISTRIBUTIONS, InstallError, import_onnxruntime

REQUIREMENTS = [Requirement(text) for text in requires("patchline")]
RUNTIME_EXTRAS = ("cpu", "gpu", "gpu-cu12", "gpu-cu13")
# onnxruntime-gpu on PyPI is built for CUDA 12 up to 1.26 and for CUDA 13 from 1.27.
LAST_CUDA12_ORT, FIRST_CUDA13_ORT = "1.26.0", "1.27.0"


def applies(req: Requirement, extra: str) -> bool:
    """Whether ``req`` is installed by ``extra`` ("": the base install) on this Python."""
    if req.marker is None:
        return not extra
    return ("extra" in str(req.marker)) == bool(extra) and req.marker.evaluate({"extra": extra})


def requested(*extras: str) -> dict[str, Requirement]:
    """The requirements `pip install 'patchline[EXTRAS]'` asks for, by name; patchline's own extras expanded."""
    found: dict[str, Requirement] = {}
    todo, done = ["", *extras], set()
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        for req in REQUIREMENTS:
            if not applies(req, extra):
                continue
            if canonicalize_name(req.name) == "patchline":
                todo.extend(req.extras)
            else:
                found[canonicalize_name(req.name)] = req
    return found


def onnx_runtimes(reqs: dict[str, Requirement]) -> set[str]:
    return set(reqs) & set(ORT_DISTRIBUTIONS)


def test_base_install_is_the_runtime_without_torch_or_an_onnx_runtime() -> None:
    base = requested()
    assert {"numpy", "opencv-python-headless", "paho-mqtt", "pydantic"} <= set(base)
    assert not set(base) & {"torch", "torchvision", "timm"}
    assert not onnx_runtimes(base)


@pytest.mark.parametrize("extra", RUNTIME_EXTRAS)
def test_each_runtime_extra_installs_exactly_one_onnx_runtime(extra: str) -> None:
    assert len(onnx_runtimes(requested(extra))) == 1


@pytest.mark.parametrize("extras", [("export",), ("calibration",), ("dev",), ("jetson",),
                                    ("export", "calibration", "dev")])
def test_the_other_extras_bring_no_onnx_runtime_of_their_own(extras: tuple[str, ...]) -> None:
    # So that each combines with any one of the runtime extras (`make venv`: cpu,export,calibration,dev).
    assert not onnx_runtimes(requested(*extras))


@pytest.mark.parametrize("extra,major", [("gpu-cu12", 12), ("gpu", 12), ("gpu-cu13", 13)])
def test_gpu_extras_pin_one_cuda_major(extra: str, major: int) -> None:
    reqs = requested(extra)
    other = 25 - major
    # The bare `tensorrt` package follows the newest CUDA major (10.16 is a CUDA 13 build).
    assert "tensorrt" not in reqs and f"tensorrt-cu{other}" not in reqs and f"cupy-cuda{other}x" not in reqs
    assert f"cupy-cuda{major}x" in reqs
    tensorrt = reqs[f"tensorrt-cu{major}"].specifier
    assert tensorrt.contains("11.4.0") and not tensorrt.contains("12.0.0")  # TensorRT 10 and 11, nothing untested
    ort = reqs["onnxruntime-gpu"]
    assert ort.specifier.contains(LAST_CUDA12_ORT) == (major == 12)
    assert ort.specifier.contains(FIRST_CUDA13_ORT) == (major == 13)
    assert {"cuda", "cudnn"} <= ort.extras  # CUDA and cuDNN of the same major, from PyPI


def test_jetson_extra_leaves_tensorrt_and_onnx_runtime_to_jetpack() -> None:
    reqs = requested("jetson")
    assert "pycuda" in reqs
    assert not {name for name in reqs if name.startswith("tensorrt")} and not onnx_runtimes(reqs)


def test_two_onnx_runtimes_are_refused_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A second distribution's metadata where importlib.metadata looks, as pip would have left it.
    info = tmp_path / "onnxruntime_gpu-1.26.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.26.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InstallError, match=r"onnxruntime and onnxruntime-gpu are installed together .* pip uninstall -y "
                                           r"onnxruntime onnxruntime-gpu, then pip install 'patchline\[cpu\]'"):
        import_onnxruntime()


def test_no_onnx_runtime_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: the import fails
    with pytest.raises(InstallError, match=r"no ONNX Runtime is installed: pip install 'patchline\[cpu\]'"):
        import_onnxruntime()


def test_every_runtime_module_imports_without_torch() -> None:
    """Also on Python 3.10 (`make test`): no 3.11-only import or syntax in any runtime module (the tools' included),
    used by a test or not."""
    code = """
import pkgutil, sys, importlib
import patchline.runtime as runtime
names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "patchline.runtime.")]
for name in names:
    importlib.import_module(name)
print(len(names), sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert int(out[0]) >= 25 and out[1].strip() == "[]"
