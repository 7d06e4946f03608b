"""The real GPU libraries' Python side, checked where there is no GPU.

- pycuda: the benchmark's machine facts read its version from the real package (its top-level
  module is plain Python, so the sdist's copy imports without CUDA).

The files come from PyPI through pip (tests/pypi.py) into pytest's cache folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pypi import fetch, unpack

ROOT = Path(__file__).resolve().parent.parent
PYCUDA = "pycuda==2025.1.2"
@pytest.fixture(scope="module")
def pypi_cache(request) -> Path:
    return request.config.cache.mkdir("pypi")


def test_bench_reads_the_real_pycuda_version(pypi_cache, tmp_path) -> None:
    """pycuda has no __version__ (bench-gpu crashed on it before measuring anything): VERSION_TEXT."""
    import onnxruntime

    source = unpack(fetch(PYCUDA, pypi_cache, binary=False), tmp_path / "pycuda")
    code = "import json; from patchline.runtime.bench_gpu import library_versions; print(json.dumps(library_versions()))"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(source)},
                            capture_output=True, text=True, check=True)
    versions = json.loads(result.stdout)
    assert versions["pycuda"] == PYCUDA.split("==")[1]
    assert versions["onnxruntime"] == onnxruntime.__version__
    assert versions["tensorrt"].startswith("not importable")
