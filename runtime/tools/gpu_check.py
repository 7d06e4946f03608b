"""The prepared GPU check (``patchline gpu-check``, ``make gpu-check``): one unattended run on a GPU box.

It verifies the GPU paths for real and writes one JSON report:
- environment: ``nvidia-smi``, the device, driver, TensorRT/pycuda/ONNX Runtime versions and providers;
- parity: the artifact's test images scored by the CPU runtime (ONNX Runtime on the CPU, BLAS search) and by
  every GPU combination that can run here (CPU backbone + CUDA kernel in FP32 and FP16, TensorRT FP32/FP16/INT8
  + CUDA kernel, ONNX Runtime's CUDA provider + CUDA kernel); per combination the largest relative score
  difference, the largest anomaly-map difference (relative to the CPU map's peak) and the OK/NG flips at the
  artifact's threshold;
- the GPU tests (tests/test_gpu_*.py, tests/test_engine_cache.py) under pytest, with counts and skip reasons;
- ``bench-gpu`` with few repeats.

A part that cannot run (no TensorRT, no onnxruntime-gpu) is recorded with the reason and the rest still runs;
``passed`` is true when every part that ran kept its tolerance and no test failed.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchline.runtime.artifact import Artifact, load_artifact
from patchline.runtime.config import TensorRtConfig
from patchline.runtime.decision import rejected
from patchline.runtime.preprocess import ImageError, iter_images, list_images
from patchline.runtime.tools.bench import write_result

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GPU_TESTS = ("tests/test_gpu_kernel.py", "tests/test_gpu_engines.py", "tests/test_engine_cache.py")


@dataclass(frozen=True)
class Combination:
    """One way of running the model on the GPU, and how far its raw scores may stray from the CPU runtime's."""

    engine: str
    distance: str
    tolerance: float  # relative, on raw image scores
    options: dict[str, object]
    # Needs only what every GPU path needs (pycuda, nvcc); the others may be absent on a box, as recorded
    required: bool = False


def combinations(cache_dir: Path) -> dict[str, Combination]:
    def trt(precision: str) -> dict[str, object]:
        return {"tensorrt": TensorRtConfig(precision=precision, cache_dir=str(cache_dir), batch_profile=(1, 1, 4))}

    # FP32 paths must agree with the CPU as the CPU agrees with anomalib; FP16 storage of the bank or of the
    # backbone's activations costs about 1e-3 relative; INT8 is reported, its flips are what matters.
    return {
        "onnxruntime-cpu + cuda kernel fp32": Combination("onnxruntime", "cuda", 1e-4, {}, required=True),
        "onnxruntime-cpu + cuda kernel fp16": Combination("onnxruntime", "cuda-fp16", 5e-3, {}, required=True),
        "tensorrt fp32 + cuda kernel fp32": Combination("tensorrt", "cuda", 1e-3, trt("fp32")),
        "tensorrt fp16 + cuda kernel fp32": Combination("tensorrt", "cuda", 2e-2, trt("fp16")),
        "tensorrt int8 + cuda kernel fp32": Combination("tensorrt", "cuda", float("inf"), trt("int8")),
        "onnxruntime-cuda + cuda kernel fp32": Combination("onnxruntime", "cuda", 1e-3, {"device": "cuda"}),
    }


def _run_part(report: dict[str, object], name: str, part: Callable[[], object]) -> None:
    """Run one part; an exception is that part's result (with its reason), not the end of the check."""
    start = time.perf_counter()
    try:
        report[name] = part()
    except Exception as exc:  # noqa: BLE001 - a missing library or a driver problem is a finding here
        log.warning("gpu-check: %s did not run: %s", name, exc)
        report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    log.info("gpu-check: %s took %.1f s", name, time.perf_counter() - start)


def environment() -> dict[str, object]:
    from patchline.runtime.tools.bench_gpu import library_versions
    import onnxruntime as ort

    from patchline.runtime.search.cuda_device import CudaDevice
    from patchline.runtime.search.gpu_distance import find_nvcc

    smi = shutil.which("nvidia-smi")
    nvcc = find_nvcc()
    return {
        "nvidia_smi": subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=60).stdout.strip() if smi else None,
        "nvcc": subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                               timeout=60).stdout.strip().splitlines()[-1] if nvcc else None,
        "device": CudaDevice("cuda").describe(),
        "versions": library_versions(),
        "onnxruntime_providers": ort.get_available_providers(),
    }


def read_test_images(folder: Path, limit: int) -> list[tuple[str, np.ndarray]]:
    images = [(str(path), rgb) for path, rgb in iter_images(list_images(folder)[:limit])
              if not isinstance(rgb, ImageError)]
    if not images:
        raise FileNotFoundError(f"no readable test images under {folder}")
    return images


def compare(reference: list[tuple[float, np.ndarray]], other: list[tuple[float, np.ndarray]], threshold: float | None,
            tolerance: float) -> dict[str, object]:
    """Score and map differences of ``other`` against ``reference``, and the OK/NG flips at ``threshold``."""
    ref_scores = np.array([s for s, _ in reference], np.float64)
    scores = np.array([s for s, _ in other], np.float64)
    score_rel = np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-12)
    map_rel = [float(np.max(np.abs(m - r)) / max(float(np.max(np.abs(r))), 1e-12))
               for (_, r), (_, m) in zip(reference, other)]
    finite = bool(np.all(np.isfinite(scores)))
    flips = (int(np.sum(rejected(scores, threshold) != rejected(ref_scores, threshold)))
             if threshold is not None else None)
    return {
        "images": len(scores),
        "max_rel_score_diff": float(np.max(score_rel)),
        "median_rel_score_diff": float(np.median(score_rel)),
        "max_rel_map_diff": max(map_rel),
        "flips": flips,
        "tolerance": tolerance,
        "passed": finite and bool(np.max(score_rel) <= tolerance) and not flips,
    }


def parity(artifact: Artifact, images: list[tuple[str, np.ndarray]], cache_dir: Path) -> dict[str, object]:
    from patchline.runtime.inspector import Inspector

    def scores(inspector: Inspector) -> list[tuple[float, np.ndarray]]:
        inspector.warm_up()
        return [(r.score, r.anomaly_map) for r in (inspector.inspect(rgb) for _, rgb in images)]

    calibration = artifact.manifest.calibration
    threshold = calibration.image_threshold if calibration is not None else None
    reference = scores(Inspector(artifact))
    out: dict[str, object] = {"threshold": threshold, "cpu_scores": [round(s, 6) for s, _ in reference]}
    for name, combo in combinations(cache_dir).items():
        def one(combo: Combination = combo) -> dict[str, object]:
            inspector = Inspector(artifact, engine=combo.engine, distance=combo.distance, **combo.options)
            return compare(reference, scores(inspector), threshold, combo.tolerance)

        _run_part(out, name, one)
    return out


def gpu_tests(junit: Path) -> dict[str, object]:
    """The GPU test modules under pytest, in a child process so a crash in a driver is a result."""
    # Skip reasons (-rs) go to the log; the counts come from the JUnit file, which pytest always writes.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *GPU_TESTS], cwd=REPO, capture_output=True, text=True, timeout=420)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        detail = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "detail": detail[:300]})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
    return {"exit_code": proc.returncode, "counts": counts, "cases": cases, "tail": proc.stdout[-3000:],
            "passed": proc.returncode == 0 and counts["passed"] > 0}


def run_check(artifact_dir: str | Path, images: str | Path, out_dir: str | Path, repeats: int = 20,
              max_images: int = 24) -> tuple[dict[str, object], Path]:
    """All parts in order; returns the report and the path it was written to."""
    from patchline.runtime.tools.bench_gpu import run_benchmark

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = out_dir / "engines"
    artifact = load_artifact(artifact_dir)
    report: dict[str, object] = {"artifact": {"folder": str(artifact_dir), "model_id": artifact.manifest.model_id,
                                              "bank": list(artifact.bank.shape)}}
    _run_part(report, "environment", environment)
    if "error" in report["environment"]:  # no usable GPU: nothing below can run
        report["passed"] = False
        return report, write_result("gpu-check", report, out_dir)
    test_images = read_test_images(Path(images), max_images)
    _run_part(report, "parity", lambda: parity(artifact, test_images, cache_dir))
    _run_part(report, "tests", lambda: gpu_tests(out_dir / "gpu-tests.xml"))
    _run_part(report, "bench_gpu", lambda: run_benchmark(artifact_dir, repeats=repeats, batch=4,
                                                         settings=TensorRtConfig(cache_dir=str(cache_dir))))
    report["passed"] = verdict(report, cache_dir)
    return report, write_result("gpu-check", report, out_dir)


def verdict(report: dict[str, object], cache_dir: Path) -> bool:
    """True when every required combination ran and passed, every other that ran passed, and the tests passed."""
    parity = report["parity"]
    if "error" in parity:
        return False
    required = [name for name, combo in combinations(cache_dir).items() if combo.required]
    ran = [v for v in parity.values() if isinstance(v, dict) and "passed" in v]
    return (all("passed" in parity[name] for name in required) and all(v["passed"] for v in ran)
            and report.get("tests", {}).get("passed", False))


def summary(report: dict[str, object]) -> str:
    """A few lines for the operator's terminal; the JSON holds the rest."""
    lines = [f"gpu-check: {'PASSED' if report['passed'] else 'FAILED'}"]
    if "error" in report["environment"]:
        lines.append(f"  no GPU to check: {report['environment']['error']}")
    for name, result in report.get("parity", {}).items():
        if isinstance(result, dict):
            if "error" in result:
                lines.append(f"  {name}: not run ({result['error'][:160]})")
            else:
                lines.append(f"  {name}: max rel score diff {result['max_rel_score_diff']:.2e}, "
                             f"map {result['max_rel_map_diff']:.2e}, flips {result['flips']} "
                             f"({'ok' if result['passed'] else 'FAILED'})")
    tests = report.get("tests", {})
    lines.append(f"  tests: {json.dumps(tests.get('counts', tests.get('error')))}")
    return "\n".join(lines)
