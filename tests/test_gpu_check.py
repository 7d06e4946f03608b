"""The prepared GPU check's arithmetic, and what it reports on a machine without a GPU (the GPU run is `make gpu-check`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from patchline.runtime.search.cuda_device import gpu_unavailable_reason
from patchline.runtime.tools.gpu_check import compare


def _results(scores: list[float]) -> list[tuple[float, np.ndarray]]:
    return [(s, np.full((4, 4), s, np.float32)) for s in scores]


def test_compare_measures_differences_and_flips() -> None:
    reference = _results([1.0, 2.0, 4.0])
    result = compare(reference, _results([1.0, 2.1, 3.9]), threshold=2.05, tolerance=0.1)
    assert result["max_rel_score_diff"] == pytest.approx(0.05)
    assert result["max_rel_map_diff"] == pytest.approx(0.05)
    assert result["flips"] == 1  # 2.0 was OK, 2.1 is NG
    assert result["passed"] is False
    assert compare(reference, _results([1.0, 2.0, 4.0001]), 2.05, 1e-4)["passed"] is True


def test_compare_fails_closed_on_non_finite_scores() -> None:
    result = compare(_results([1.0, 2.0]), _results([1.0, float("nan")]), threshold=None, tolerance=float("inf"))
    assert result["flips"] is None
    assert result["passed"] is False


def test_verdict_needs_the_kernel_combinations_and_every_part_that_ran(tmp_path) -> None:
    """A kernel combination that crashed fails the check; a TensorRT one whose library is absent does not."""
    from patchline.runtime.tools.gpu_check import verdict

    ok = {"passed": True}
    parity = {"threshold": 1.0, "cpu_scores": [], "onnxruntime-cpu + cuda kernel fp32": ok,
              "onnxruntime-cpu + cuda kernel fp16": ok, "tensorrt fp16 + cuda kernel fp32": {"error": "no tensorrt"}}
    report = {"parity": parity, "tests": {"passed": True}}
    assert verdict(report, tmp_path) is True
    assert verdict({**report, "tests": {"passed": False}}, tmp_path) is False
    crashed = {**parity, "onnxruntime-cpu + cuda kernel fp16": {"error": "CompileError"}}
    assert verdict({**report, "parity": crashed}, tmp_path) is False
    off = {**parity, "tensorrt fp16 + cuda kernel fp32": {"passed": False}}
    assert verdict({**report, "parity": off}, tmp_path) is False


@pytest.mark.skipif(gpu_unavailable_reason() is None, reason="a GPU is present: `make gpu-check` runs the real check")
def test_gpu_check_without_a_gpu_writes_a_failed_report(small_artifact, sample_data, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "patchline.runtime.cli", "gpu-check", "--artifact",
                           str(small_artifact), "--images", str(sample_data / "test"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "no GPU to check" in proc.stdout
    (report_file,) = tmp_path.glob("gpu-check-*.json")
    report = json.loads(report_file.read_text())
    assert report["passed"] is False
    assert report["environment"]["error"].startswith("GpuUnavailable")
    assert report["artifact"]["model_id"]
